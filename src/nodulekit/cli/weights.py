"""``nodulekit weights``: train the weights that ship with the package (``make weights``)."""

from __future__ import annotations


def add_parser(sub):
    from nodulekit.cli._config import number_type, output_folder
    from nodulekit.release import ReleaseConfig
    from nodulekit.train.config import POSITIVE, SHARE

    d = ReleaseConfig()
    p = sub.add_parser(
        "weights",
        help="train the shipped weights (the release recipe: 3x the demo's scans, longer training, about 30 min "
             "on 2 cores)",
        description="Generate a larger synthetic draw than the demo's, train the segmentation and the classifier "
                    "on it for longer, detect and score the held-out scans, and install seg.pt, cls.pt and their "
                    "manifest (hashes, recipe, time, held-out CPM) into the package, where `nodulekit detect` "
                    "finds them when --seg and --cls are not given.")
    p.add_argument("--out", default=d.out, type=output_folder, help="working folder (default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-install", action="store_true", help="train and score, but leave the package's weights "
                                                                "(OUT/weights.json records the run)")
    mode.add_argument("--install-from", metavar="DIR", default=None,
                      help="train nothing: install the pair a finished `--no-install` run left in DIR "
                           "(the training options are ignored)")
    positive = number_type(int, POSITIVE)
    for name, what in (("scans", "synthetic scans"), ("val_scans", "of them held out"),
                       ("seg_epochs", "segmentation epochs"), ("seg_steps", "segmentation steps per epoch"),
                       ("cls_epochs", "classifier epochs"), ("cls_steps", "classifier steps per epoch"),
                       ("cls_detector_from", "first classifier epoch with the detector's negatives"),
                       ("mine_slices", "middle slices of each training scan mined")):
        p.add_argument(f"--{name.replace('_', '-')}", type=positive, default=getattr(d, name),
                       help=f"{what} (default: %(default)s)")
    p.add_argument("--thick-share", type=number_type(float, SHARE), default=d.thick_share, metavar="F",
                   help="share of the draw's scans with 3 mm slices, as routine clinical CT has (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the draw and the training (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nodulekit.release import ReleaseConfig, build_weights, install_run

    if args.install_from is not None:
        doc = install_run(args.install_from)
        cpm = (doc.get("held_out") or {}).get("cpm")
        print(f"installed the weights of {args.install_from} (seed {doc['recipe'].get('seed')}"
              + ("" if cpm is None else f"; held-out CPM {cpm:.3f}") + ")")
        return 0
    cfg = ReleaseConfig(out=args.out, install=not args.no_install, scans=args.scans, val_scans=args.val_scans,
                        seed=args.seed, seg_epochs=args.seg_epochs, seg_steps=args.seg_steps,
                        cls_epochs=args.cls_epochs, cls_steps=args.cls_steps,
                        cls_detector_from=args.cls_detector_from, mine_slices=args.mine_slices,
                        thick_share=args.thick_share)
    if cfg.val_scans >= cfg.scans:
        from nodulekit.errors import InputError

        raise InputError("--val-scans", f"{cfg.val_scans} held out of {cfg.scans} scans leaves none to train on")
    doc = build_weights(cfg)
    held = doc["held_out"]
    print(f"weights trained in {doc['seconds'] / 60:.1f} min; held-out CPM {held['cpm']:.3f} over "
          f"{held['n_scans']} scans, {held['n_nodules']} nodules"
          + ("; installed" if cfg.install else "; not installed (--no-install)"))
    return 0
