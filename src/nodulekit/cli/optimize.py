"""``nodulekit optimize``: the compression study (prune, PTQ, QAT and their combinations)."""

from __future__ import annotations


def add_parser(sub):
    from nodulekit.optimize.quantize import CALIB_METHODS
    from nodulekit.optimize.study import StudyConfig
    from nodulekit.optimize.variants import VARIANTS

    d = StudyConfig()
    p = sub.add_parser("optimize", help="build, export and measure the compression variants",
                       description="Build the compression variants of a segmentation checkpoint, export them, "
                                   "measure them on the deployed files and write report.json + REPORT.md.")
    p.add_argument("--seg", required=True, help="baseline segmentation checkpoint")
    p.add_argument("--data", required=True, help="LUNA16-layout dataset folder")
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                   help="variants to build (default: all; baseline is always included)")
    p.add_argument("--prune-ratio", default=d.prune_ratio,
                   help="channel ratio: '0.5' or per block 'down_path.0=0.3,up_path.1=0.6' (default %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    p.add_argument("--finetune-samples-per-epoch", type=int, default=d.finetune_samples_per_epoch,
                   help="training crops per fine-tuning epoch of the pruned model (default: --samples-per-epoch)")
    p.add_argument("--fn-weight", type=float, default=d.fn_weight, help="false-negative weight while fine-tuning")
    p.add_argument("--dice-area-cap", type=float, default=d.dice_area_cap,
                   help="area cap of the pooled Dice while fine-tuning and in QAT (default %(default)s; 0: "
                        "none; see nodulekit.train.losses)")
    p.add_argument("--qat-epochs", type=int, default=d.qat_epochs)
    p.add_argument("--qat-val-every", type=int, default=d.qat_val_every,
                   help="validate the fake-quant graph every N QAT epochs and after the last, keeping the best "
                        "epoch by recall (default %(default)s; 0: export the last epoch)")
    p.add_argument("--qat-val-slices", type=int, default=d.qat_val_slices,
                   help="validation slices for picking the QAT epoch, nodule slices first (default %(default)s; "
                        "0: all; the fake-quant graph takes about 0.7 s per 512x512 slice)")
    p.add_argument("--qat-lr", type=float, default=d.qat_lr)
    p.add_argument("--fn-weight-qat", type=float, default=d.fn_weight_qat, help="false-negative weight during QAT")
    p.add_argument("--calib-slices", type=int, default=d.calib_slices)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of scans held out for measuring, as in training (default %(default)s)")
    p.add_argument("--calib-method", choices=CALIB_METHODS, default=d.calib_method)
    p.add_argument("--samples-per-epoch", type=int, default=d.samples_per_epoch)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--bench-runs", type=int, default=d.bench_runs)
    p.add_argument("--bench-warmup", type=int, default=d.bench_warmup)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--no-torchscript", action="store_true", help="skip the TorchScript exports")
    p.add_argument("--rknn", action="store_true", help="also build RKNN models (needs .venv-rknn)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.optimize.study import StudyConfig, run_study

    cfg = StudyConfig(
        variants=tuple(args.variants) if args.variants else None, prune_ratio=args.prune_ratio,
        finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
        finetune_samples_per_epoch=args.finetune_samples_per_epoch, fn_weight=args.fn_weight,
        dice_area_cap=args.dice_area_cap or None,
        qat_epochs=args.qat_epochs, qat_val_every=args.qat_val_every,
        qat_val_slices=args.qat_val_slices or None, qat_lr=args.qat_lr,
        fn_weight_qat=args.fn_weight_qat, calib_slices=args.calib_slices, calib_method=args.calib_method,
        val_fraction=args.val_fraction, samples_per_epoch=args.samples_per_epoch, batch_size=args.batch_size,
        workers=args.workers, bench_runs=args.bench_runs,
        bench_warmup=args.bench_warmup, threads=args.threads, torchscript=not args.no_torchscript,
        rknn=args.rknn, seed=args.seed)
    report = run_study(args.seg, args.data, args.out, cfg)
    for row in report["variants"]:
        if "error" in row:
            print(f"{row['name']:<12} ERROR {row['error']}")
        else:
            print(f"{row['name']:<12} {row['weight_memory_kib']:9.2f} KiB  {row['latency_us'] or 0:10.0f} us  "
                  f"recall {100 * (row['recall'] or 0):5.1f}%  {row['artifact']}")
    print(f"report: {args.out}/REPORT.md")
    return 1 if all("error" in r for r in report["variants"]) else 0
