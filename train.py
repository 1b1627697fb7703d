"""Train or evaluate a ctal model.

    python train.py                                   # synthetic scenes, CTALNet, CPU-sized run
    python train.py --config nyuv2_ctal data.root=/data/nyuv2 model.ctal_backend=linear
    python train.py --config nyuv2_ctal --resume auto # continue from <output_dir>/last.pt
    python train.py --config nyuv2_ctal --eval-only --checkpoint outputs/nyuv2_ctal/best.pt
    torchrun --nproc_per_node 2 train.py --config ... # data parallel (gloo on CPU, nccl on GPU)

``--config`` takes a YAML path or the name of a packaged config in ctal/configs/. Trailing
``key.sub=value`` arguments override config entries (values are parsed as YAML).
Bad input (config, files, data, a diverged run) is reported as one line; set CTAL_TRACEBACK=1
for the full traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ctal import config as cfglib
from ctal._checks import positive_int_arg
from ctal._io import write_json


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="synthetic", help="YAML file or packaged config name (default: synthetic)")
    ap.add_argument("--output-dir", default=None, help="where checkpoints, logs and metrics go "
                    "(default: the config's output_dir)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: config, else auto)")
    ap.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' = <output_dir>/last.pt if present")
    ap.add_argument("--overwrite", action="store_true", help="start a fresh run even if the output dir "
                    "holds checkpoints of an earlier run (they are replaced; without it such a run is refused)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the val split and exit")
    ap.add_argument("--checkpoint", default=None, help="weights for --eval-only (default: <output_dir>/best.pt)")
    ap.add_argument("--max-steps-per-epoch", type=positive_int_arg, default=None, metavar="N",
                    help="cap steps per epoch (smoke tests; N >= 1)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    # intermixed: overrides may sit before, between or after the flags
    return ap.parse_intermixed_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.overwrite and (args.resume or args.eval_only):
        raise cfglib.ConfigError("--overwrite starts a fresh run; it cannot be combined with "
                                 f"{'--resume' if args.resume else '--eval-only'}")
    if args.checkpoint and not args.eval_only:
        raise cfglib.ConfigError("--checkpoint names the weights for --eval-only; to continue a run "
                                 "use --resume PATH (or --resume auto)")
    if args.eval_only and args.resume:
        raise cfglib.ConfigError("--eval-only evaluates --checkpoint (default <output_dir>/best.pt); "
                                 "it does not resume. Pass --checkpoint PATH instead of --resume")
    cfg = cfglib.validate(cfglib.apply_overrides(cfglib.load(args.config), args.overrides))
    out = cfglib.output_dir(cfg, args.output_dir)
    from ctal.engine import Trainer, checkpoint
    # A fresh run (no --resume, or --resume auto without a last.pt) would overwrite the checkpoints
    # of an earlier run in the same directory: refuse before anything is generated or built.
    fresh = not args.eval_only and (args.resume is None or (args.resume == "auto" and not (out / "last.pt").is_file()))
    if fresh and not args.overwrite:
        checkpoint.refuse_fresh_run(out)
    if not args.eval_only and args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint")
    if args.eval_only:
        ckpt = Path(args.checkpoint) if args.checkpoint else out / "best.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"--eval-only: no checkpoint {ckpt} (pass --checkpoint PATH)")
    trainer = Trainer(cfg, output_dir=args.output_dir, device=args.device, progress=not args.no_progress,
                      eval_only=args.eval_only)
    try:
        if args.eval_only:
            trainer.load_weights(ckpt)
            metrics = trainer.evaluate()
            if trainer.dist.is_main:
                write_json(trainer.out / "eval_metrics.json", dict(checkpoint=str(ckpt), metrics=metrics),
                           default=float)
                from ctal.engine.evaluation import format_summary
                print(format_summary(metrics))
            return metrics
        if args.overwrite and trainer.dist.is_main:
            for p in checkpoint.existing(trainer.out):  # the new run's first epoch would replace them
                print(f"--overwrite: removing {checkpoint.describe(p)} of an earlier run", file=sys.stderr)
                p.unlink()
        if args.resume:
            path = trainer.out / "last.pt" if args.resume == "auto" else Path(args.resume)
            if path.is_file():  # (an explicit path was checked above; auto without last.pt starts fresh)
                trainer.resume(path)
                print(f"resumed from {path} at epoch {trainer.start_epoch}", file=sys.stderr)
        return trainer.fit(max_steps_per_epoch=args.max_steps_per_epoch)
    finally:
        trainer.close()


def _user_errors() -> tuple:
    """Exceptions that mean bad input (config, files, data, divergence): reported as one line.
    Anything else is a bug and keeps its traceback."""
    from ctal.data import DataFileError
    from ctal.engine.checkpoint import CheckpointError
    return (cfglib.ConfigError, FileExistsError, FileNotFoundError, NotADirectoryError,
            PermissionError, DataFileError, CheckpointError, FloatingPointError)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("train.py: interrupted (the last completed epoch is in <output_dir>/last.pt; "
                 "continue with --resume auto)")
    except Exception as e:  # noqa: BLE001 - bad input: the message, not a traceback
        if not isinstance(e, _user_errors()) or os.environ.get("CTAL_TRACEBACK"):
            raise
        sys.exit(f"train.py: error: {e}")
