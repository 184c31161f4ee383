"""The ``cmmas`` command: prepare an atlas set, segment a scan, register a pair.

Every sub-command parses its arguments and calls the library (:mod:`cmmas.segment`,
:mod:`cmmas.register`); TensorFlow and ANTs are imported only when a command runs, so
``--help`` is instant. Bad input ends with one line ``cmmas: error: <file>: <problem>`` on
stderr and exit status 1. Progress bars are drawn only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cmmas.errors import CmmasError

if TYPE_CHECKING:
    from cmmas.segment import SegmentConfig

#: Fusion names ``--fusion`` accepts (the names of cmmas.fuse.registry.names(), which segment checks again).
FUSIONS = ("simnet", "dlf", "unet", "mv", "staple", "global", "lwv", "lwv_ncc", "jlf", "jlf_r2", "jlf_tf", "lwv_mind",
           "jlf_mind")


def _triple(text: str, kind=float) -> tuple:
    try:
        parts = [kind(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 4 or 4,4,3, got {text!r}") from None
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or any(p <= 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected one or three comma-separated positive values, got {text!r}")
    return tuple(parts)


def _int_triple(text: str) -> tuple:
    return _triple(text, int)


def _atlases(text: str) -> int | Path:
    if re.fullmatch(r"[+-]?\d+", text.strip()):
        if int(text) < 1:
            raise argparse.ArgumentTypeError("the number of atlases must be at least 1")
        return int(text)
    return Path(text)


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmmas",
        description="Cross-modality multi-atlas segmentation: BiRegNet registration + SimNet fusion. "
        "Run `cmmas <command> --help` for each command's flags.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (before the command)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    _prepare_parser(sub)
    _segment_parser(sub)
    _batch_parser(sub)
    _register_parser(sub)
    return parser


def _prepare_parser(sub) -> None:
    prep = sub.add_parser(
        "prepare-atlases",
        help="check labelled atlases, align them once to a reference and store them as an atlas set",
        description="Check every atlas (readable 3D image, label on the image's grid with codes of the label "
        "table, not empty; the first bad one is named), align each once to a reference atlas (ANTs rigid + "
        "affine, mutual information) and store the images (normalised to [0, 1]), labels and transforms on a "
        "working grid centred on the union of the aligned labels, with a manifest.json (version, reference, "
        "label table, grid shape and spacing, each case's modality). Re-running resumes.",
    )
    prep.add_argument("--atlases", type=Path, required=True, metavar="DIR",
                      help="data-set folder holding the labelled atlases")
    prep.add_argument("--layout", default="folder", choices=["folder", "mmwhs", "chaos"],
                      help="on-disk layout of --atlases (folder: {ct,mr}/<case>_image.nii.gz + "
                      "<case>_label.nii.gz and labels.json at the root; default folder)")
    prep.add_argument("--modality", required=True, choices=["ct", "mr"], help="modality of the atlases to use")
    prep.add_argument("--reference", default="auto", metavar="auto|CASE",
                      help="case id of the reference atlas, or 'auto': the atlas of median label volume")
    prep.add_argument("--ids", default=None, metavar="ID,ID,...",
                      help="comma-separated atlas ids to use (default: every labelled case)")
    prep.add_argument("--out", type=Path, required=True, metavar="ATLAS_SET", help="atlas-set folder to write")
    prep.add_argument("--like", type=Path, default=None, metavar="MODEL.keras",
                      help="take the grid (shape, spacing, alignment spacing) from this trained model's card "
                      "(MODEL.keras.json, written when it was trained), so that the model fits the atlas set")
    prep.add_argument("--shape", type=_int_triple, default=None, metavar="D,H,W",
                      help="working grid D,H,W in voxels: the BiRegNet's input shape (default 64, or --like's)")
    prep.add_argument("--spacing", type=_triple, default=None, metavar="MM",
                      help="working grid spacing D,H,W in mm (default 4, or --like's)")
    prep.add_argument("--align-spacing", type=float, default=None, metavar="MM",
                      help="isotropic spacing the affine alignments run at, mm (default 3, or --like's)")
    prep.add_argument("--margin", type=float, default=15.0, metavar="MM",
                      help="margin around the union of the aligned atlas labels, mm (default 15)")
    prep.add_argument("--component", type=int, default=None, metavar="CODE",
                      help="keep only this label code (others: background)")


def _segment_parser(sub) -> None:
    seg = sub.add_parser(
        "segment",
        help="segment one or more scans with an atlas set (or a bundle) and trained models",
        description="Align the target once to the atlas set's reference (ANTs affine, mutual information, started "
        "from several positions along the cranio-caudal axis, the best kept), "
        "resample it onto the set's working grid (the region of the atlas labels; no target label is used), "
        "register the atlases to it with BiRegNet, fuse the warped labels (SimNet or a classic method) and "
        "write the label map on the target's original grid (spacing, origin, direction), with "
        "<stem>_prob_<code>.nii.gz (per-label probability) and <stem>_agreement.nii.gz (fraction of atlases "
        "agreeing with the fused label), <stem>_volumes.csv (each structure's voxels, millilitres and mean "
        "agreement), <stem>_labels.itksnap.txt and <stem>_labels.ctbl (the label names and colours for ITK-SNAP "
        "and 3D Slicer), <stem>_preview.png with --preview, and <stem>_qc.json beside it. The QC record (always "
        "written) holds the alignment's quality: the fraction of its starts that land within 15 mm of the chosen "
        "result ('agreement'; below 0.4 the alignment is flagged: 'flagged': true, and a one-line warning is "
        "printed; aligned by organs, their overlap with the reference's below 0.3 flags it instead), the chosen "
        "start, its mutual information and its 'margin' over the best refined start that disagrees, every start, "
        "whether ANTs ran deterministically, and the seconds of each step; with an organ finder, its Dice with the "
        "segmentation per structure ('organs'), and the structures below 0.3 ('doubtful': they flag the "
        "segmentation too). A progress bar "
        "shows the steps when stderr is a terminal; a line per scan gives the atlases used and the seconds of each "
        "step. Several scans in one call load the "
        "models and the atlas set once.",
    )
    seg.add_argument("--target", type=Path, required=True, nargs="+", metavar="SCAN",
                     help="scan(s) to segment (NIfTI/MHA/NRRD file or DICOM folder)")
    seg.add_argument("--out", type=Path, required=True, metavar="SEG.nii.gz|DIR",
                     help="output label map (.nii.gz, or uncompressed .nii / .mha: the probability and agreement "
                     "maps take its format); with several --target scans a folder, each map named "
                     "<scan name>.<--format>")
    seg.add_argument("--format", default="nii.gz", choices=["nii.gz", "nii", "mha"],
                     help="image format of the maps written into a folder (several --target scans; one scan: "
                     "--out's ending): nii.gz is compressed (small files; gzip runs on one core), nii and mha are not "
                     "(faster to write and read, scan-sized files; see the README). Default nii.gz")
    seg.add_argument("--bundle", type=Path, default=None, metavar="DIR",
                     help="one folder holding atlas_set/ (or itself an atlas set), reg_model.keras, the learned "
                     "fusions' networks (simnet.keras, dlf.keras, unet.keras) and bundle.json (its default fusion); "
                     "explicit --atlas-set/--reg-model/--fusion-model override its parts")
    seg.add_argument("--atlas-set", type=Path, default=None, metavar="DIR",
                     help="atlas set made by `cmmas prepare-atlases`")
    seg.add_argument("--atlases", type=_atlases, default=None, metavar="K|DIR",
                     help="K: use the K atlases most similar to the aligned target (default: all; a K larger than "
                     "the set uses all of them, and the line per scan lists those used); or DIR: a "
                     "folder of raw labelled atlases (folder layout), prepared once into <out folder>/atlas_set")
    seg.add_argument("--atlas-modality", default=None, choices=["ct", "mr"],
                     help="modality of the atlases, when the atlas set or DIR holds labelled cases of both "
                     "(default: the reference's, or DIR's only labelled modality)")
    seg.add_argument("--reg-model", type=Path, default=None, metavar="MODEL.keras",
                     help="trained BiRegNet (.keras) of the working grid's shape (default: the bundle's)")
    seg.add_argument("--no-registration", action="store_true",
                     help="fuse the atlases after the affine alignment only, without the registration network; "
                     "with no --reg-model and no bundle model, segmenting without it must be asked for with this flag "
                     "(the log and the QC record, 'registration': false, say so)")
    seg.add_argument("--strict", action="store_true",
                     help="refuse a scan whose header is suspicious but readable (NIfTI qform and sform disagreeing, "
                     "DICOM slices not evenly spaced) instead of warning and recording it in the QC record")
    seg.add_argument("--finder-model", type=Path, default=None, metavar="FINDER.keras",
                     help="an organ finder (experiments/train_finder.py; default: the bundle's finder.keras, if any): "
                     "it finds each scan's organs on their own, and the QC record gets their Dice with the "
                     "segmentation per structure ('organs')")
    seg.add_argument("--organ-alignment", action=argparse.BooleanOptionalAction, default=None,
                     help="with an organ finder (on by default wherever there is one): the found organs are also "
                     "registered onto the atlases' organs, and that alignment or the one by mutual information, "
                     "whichever overlaps the atlases' organs more, is kept; the QC record's alignment.organ_overlap "
                     "says how well they overlap")
    seg.add_argument("--organs-only", action="store_true",
                     help="with the alignment by organs: the registration of the found organs alone, no alignment by "
                     "mutual information beside it (faster; as good wherever the finder finds the organs: "
                     "docs/results.md, 'The QC end to end')")
    seg.add_argument("--fusion-model", type=Path, default=None, metavar="MODEL.keras",
                     help="a learned fusion's trained network (.keras: SimNet, DLF or U-Net; its model card says "
                     "which), for --fusion simnet / dlf / unet (default: the bundle's)")
    seg.add_argument("--fusion", default=None, choices=FUSIONS, metavar="{" + ",".join(FUSIONS) + "}",
                     help="label fusion: dlf (Deep Label Fusion: label-specific atlas weights and a network that "
                     "corrects their vote on the scan; needs dlf.keras, trained on labelled scans of the target "
                     "modality), simnet (SimNet-weighted vote), unet (the plain U-Net baseline: the scan alone, the "
                     "atlases only for the agreement map), mv (majority vote), staple, global or "
                     "lwv (vote weighted by global / local mutual information; lwv_ncc: local NCC), jlf "
                     "(ANTs joint label fusion, patch radius 1; jlf_r2: radius 2), jlf_tf (the same joint label fusion in "
                     "TensorFlow, faster), lwv_mind and jlf_mind (the locally weighted vote and jlf_tf on MIND-SSC "
                     "descriptors instead of intensities, for atlases of another modality). Default: the fusion of an "
                     "explicit --fusion-model, else the bundle's (bundle.json: the best its evaluation measured), "
                     "else jlf_tf")
    seg.add_argument("--prealign", action=argparse.BooleanOptionalAction, default=True,
                     help="align the target to the reference first (default); --no-prealign: the target "
                     "already lies in the reference space")
    seg.add_argument("--spacing", type=_triple, default=None, metavar="MM",
                     help="working grid spacing in mm when preparing a raw --atlases DIR (default: the --reg-model's "
                     "card, else 4)")
    seg.add_argument("--transform", type=Path, nargs="+", default=None, metavar="MAT",
                     help="use this scan -> reference alignment (ANTs transform files, e.g. an atlas set's "
                          "transforms/<id>/affine.mat) instead of aligning the scan again (one target only)")
    seg.add_argument("--batch-size", type=_at_least(1), default=2, metavar="N", help="atlases per network batch (default 2)")
    seg.add_argument("--no-extras", action="store_true",
                     help="write only the label map and its QC record (the probability and agreement maps are then "
                          "not computed either: faster on large grids)")
    seg.add_argument("--preview", action="store_true",
                     help="also write <stem>_preview.png: the axial, coronal and sagittal slices through the "
                     "segmented structures' centre, the scan in grey with each structure filled in its colour and "
                     "a legend of their names")
    seg.add_argument("--fast-nondeterministic", action="store_true",
                     help="run ANTs on all threads: the alignment is ~0.4 s faster, but multi-threaded mutual "
                     "information sums in a different order on every call, so the same scan may give a different "
                     "label map (default: one ANTs thread, the same scan gives a byte-identical label map)")
    seg.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)  # the default now
    seg.add_argument("--single-start", action="store_true",
                     help="align from the centre-of-mass translation only (antspyx's start), ~1 s faster; by default "
                     "the alignment also starts 1/8 and 1/4 of the reference's height above and below it, refines "
                     "the best three distinct starts and keeps the one of highest mutual information, so that a scan "
                     "is not locked centimetres off")
    seg.add_argument("--atlas-affine", action="store_true",
                     help="give every atlas its own affine registration onto the aligned scan before the network "
                     "(~0.1 s per atlas): a trapped alignment then costs one atlas instead of all of them")
    seg.add_argument("--refine-steps", type=_at_least(0), default=0, metavar="N",
                     help="refine every atlas's field on the scan with N Adam steps on the MIND-SSC distance "
                     "(modality-independent structure) plus a diffusion penalty, starting from BiRegNet's field "
                     "(default 0: off; see docs/results.md for what it gains and costs)")
    seg.add_argument("--refine-scale", type=float, default=0.5, metavar="S",
                     help="the refinement's grid, as a fraction of the working grid's voxels per axis (default 0.5)")


def _batch_parser(sub) -> None:
    batch = sub.add_parser(
        "segment-batch",
        help="segment a cohort: every scan of a manifest with a bundle, resumable, failures recorded",
        description="Segment every scan of a manifest (a CSV with id and path columns; other columns are carried "
        "into the cohort table; relative paths are read from the manifest's folder) with a bundle, each into "
        "OUT/<id>/ (seg.nii.gz and what `cmmas segment` writes beside it, then record.json). A scan whose record "
        "exists for the same settings and bundle is skipped, so a killed run started again finishes the rest. A "
        "scan that fails (unreadable, constant, refused alignment...) is recorded in OUT/<id>/failure.json with "
        "its one-line reason and the run goes on. At the end OUT/cohort.csv holds one row per segmented scan "
        "(volumes, agreement and alignment QC per structure, seconds, settings key) and OUT/failures.csv one per "
        "manifest scan without a result; the exit status is 1 when a scan failed. On a cluster, --shard I/N runs "
        "every N-th scan from I (a SLURM array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT), and "
        "--merge writes the tables once the shards are done.",
    )
    batch.add_argument("--manifest", type=Path, default=None, metavar="SCANS.csv",
                       help="the cohort: a CSV with id and path columns (required, except with --merge)")
    batch.add_argument("--bundle", type=Path, default=None, metavar="DIR", help="the bundle to segment with "
                       "(make bundle; required, except with --merge)")
    batch.add_argument("--out", type=Path, required=True, metavar="DIR", help="the cohort folder")
    batch.add_argument("--fusion", default=None, choices=FUSIONS, metavar="{" + ",".join(FUSIONS) + "}",
                       help="fusion method (default: the bundle's)")
    batch.add_argument("--shard", default=None, metavar="I/N", help="segment every N-th scan from I (0 <= I < N) "
                       "and write no table (run --merge after the shards)")
    batch.add_argument("--dask", default=None, metavar="ADDRESS|local:N", help="distribute the scans over a "
                       "dask.distributed scheduler at ADDRESS, or over a new local cluster of N single-threaded worker "
                       "processes (each loads the bundle once; pip install 'cmmas[dask]')")
    batch.add_argument("--merge", action="store_true", help="only write OUT/cohort.csv, failures.csv and cohort.html "
                       "from the records in OUT (with --manifest, its scans without a record are listed as failures; "
                       "with --bundle and the shards' options, only records of those settings count)")
    batch.add_argument("--no-extras", action="store_true", help="write the label map, volumes and QC record only")
    batch.add_argument("--preview", action="store_true", help="also write each scan's preview PNG")
    batch.add_argument("--strict", action="store_true", help="refuse NIfTI headers that disagree (as segment)")
    batch.add_argument("--quiet", action="store_true", help="no line per scan, only the summary (for cluster logs)")


def _register_parser(sub) -> None:
    reg = sub.add_parser(
        "register",
        help="register one moving image to a fixed image with a trained BiRegNet",
        description="Warp the moving image (and its label) onto the fixed image with BiRegNet on a working grid "
        "of the network's shape centred on the fixed image; write warped_image.nii.gz, warped_label.nii.gz, "
        "ddf_{x,y,z}.nii.gz (displacement in mm) on the fixed grid and jacobian.json; print the Jacobian "
        "statistics. The images must already be affinely aligned (same physical space).",
    )
    reg.add_argument("--moving", type=Path, required=True, help="moving image (e.g. an atlas)")
    reg.add_argument("--fixed", type=Path, required=True, help="fixed image (e.g. the target)")
    reg.add_argument("--moving-label", "--moving_label", type=Path, default=None, help="label map of the moving image")
    reg.add_argument("--model", type=Path, required=True, help="trained BiRegNet (.keras)")
    reg.add_argument("--out-dir", "--out_dir", type=Path, required=True, help="folder for the outputs")
    reg.add_argument("--spacing", type=_triple, default=None, metavar="MM",
                     help="working grid spacing in mm (default: the smallest isotropic one holding the fixed image)")


def _progress() -> bool:
    return sys.stderr.isatty()


def _prepare(args) -> None:
    from cmmas.align import ants, prepare

    ants.set_threads(1)  # the same atlases give the same atlas set

    aset = prepare.prepare_atlases(
        args.atlases, args.modality, args.out, layout=args.layout, reference=args.reference,
        ids=args.ids.split(",") if args.ids else None, shape_zyx=args.shape, spacing_zyx=args.spacing,
        margin_mm=args.margin, align_spacing_mm=args.align_spacing, component=args.component,
        progress=_progress(), like=args.like,
    )
    print(f"atlas set of {len(aset.ids())} atlases (reference {aset.manifest.reference}, grid "
          f"{aset.geometry.shape} at {aset.geometry.spacing_zyx} mm) written to {args.out}")


def segment_config(args, fusion: str | None = None, finder: bool = False) -> SegmentConfig:
    """The engine's settings of a ``cmmas segment`` call (``fusion``: the default fusion where
    ``--fusion`` is not given, None: :data:`cmmas.segment.DEFAULT_FUSION`; ``finder``: an organ
    finder is at hand, which turns the alignment by organs on unless ``--no-organ-alignment``)."""
    from cmmas.segment import DEFAULT_FUSION, SegmentConfig

    return SegmentConfig(
        fusion=args.fusion or fusion or DEFAULT_FUSION, atlases=args.atlases if isinstance(args.atlases, int) else None,
        modality=args.atlas_modality, prealign=args.prealign, starts="single" if args.single_start else "robust",
        organ_alignment=(finder and args.prealign and not args.single_start) if args.organ_alignment is None
        else args.organ_alignment,
        organ_registration=args.organs_only,
        atlas_affine=args.atlas_affine, refine_steps=args.refine_steps, refine_scale=args.refine_scale,
        maps=not args.no_extras, batch_size=args.batch_size)


def _check_segment_request(args, codes: Sequence[int] = ()) -> list[Path]:
    """Refuse a ``segment`` request before any image or model is read (:mod:`cmmas.request`):
    an output (the label map or a name derived from it, :func:`cmmas.outputs.output_paths`) equal
    to an input or inside an input folder, or to another output of the call; an output that is a
    folder, ends in '/', has an unsupported ending or lies in an unwritable folder; options out of
    range.

    Args:
        args: the parsed ``segment`` arguments.
        codes: the atlas set's label codes (the ``prob_<code>`` names); without them, the codes
            of any input named like one of the probability maps, so that a collision is found
            before the atlas set is read.

    Returns:
        Each target's label-map path.

    Raises:
        CmmasError: the first problem, one line naming the argument and the file.
    """
    from cmmas import outputs as names, request

    request.check_at_least("--refine-steps", args.refine_steps, 0)
    request.check_at_least("--batch-size", args.batch_size, 1)
    outs = names.label_paths(args.target, args.out)
    if len(outs) > 1:
        outs = [out.with_name(out.name[: -len(".nii.gz")] + "." + args.format) for out in outs]
    else:
        request.check_image_output("--out", args.out)
    inputs = (request.image_inputs("--target", args.target) + request.image_inputs("--transform", args.transform)
              + [(flag, path) for flag, path in (("--bundle", args.bundle), ("--atlas-set", args.atlas_set),
                                                 ("--reg-model", args.reg_model), ("--fusion-model", args.fusion_model),
                                                 ("--atlases", args.atlases)) if isinstance(path, Path)])
    skipped = ({"agreement"} if args.no_extras else set()) | (set() if args.preview else {"preview"})
    written = []
    for out in outs:
        derived = names.output_paths(out, sorted({int(c) for c in codes} or _prob_codes(out, inputs)))
        written += request.output_names(out, {kind: path for kind, path in derived.items() if kind not in skipped
                                              and not (args.no_extras and kind.startswith("prob_"))})
    request.check_outputs(inputs, written)
    return outs


def _prob_codes(out: Path, inputs: Sequence[tuple[str, Path]]) -> set[int]:
    """The codes of the inputs named as ``out``'s probability maps would be (``<stem>_prob_<code>``
    and ``out``'s ending, as :func:`cmmas.outputs.output_paths` names them)."""
    from cmmas import outputs

    first = outputs.output_paths(out, [0])["prob_0"]
    pattern = re.escape(first.name).replace("_prob_0", r"_prob_(\d+)", 1)
    return {int(m.group(1)) for _, path in inputs if (m := re.fullmatch(pattern, Path(path).name))}


def _segment(args) -> None:
    from cmmas import bundle as bundles
    from cmmas import outputs
    from cmmas.align import ants, prepare
    from cmmas.align.atlas_set import AtlasSet
    from cmmas.io import read_image
    from cmmas.models import learned_models
    from cmmas.segment import Segmenter

    if not args.fast_nondeterministic:
        ants.set_threads(1)  # before this process's first ANTs registration
    outs = _check_segment_request(args)
    config = segment_config(args)
    if args.transform is not None and len(args.target) > 1:
        raise CmmasError(args.transform[0], "--transform is one scan's alignment: give one --target with it")
    if args.transform is not None:
        ants.check_transforms(args.transform)  # before the models load
    atlas_set, reg_model = args.atlas_set, args.reg_model
    if isinstance(args.atlases, Path):
        if args.atlas_set is not None or args.bundle is not None:
            raise CmmasError(args.atlases, "give raw --atlases DIR, or --atlas-set/--bundle, not both")
        from cmmas.nn import model_card

        shape, like = None, None
        if reg_model is not None and not args.no_registration:
            if model_card.read_card(reg_model) is not None:
                like = reg_model  # the grid it was trained on
            else:  # a model without a card: its input shape at least (the engine loads the file again)
                from cmmas.nn import training

                shape = training.input_grid(training.load_model(reg_model, "biregnet"), "biregnet")
        atlas_set = prepare.raw_atlas_set(args.atlases, args.atlas_modality, outs[0].parent / "atlas_set",
                                           shape, args.spacing, progress=_progress(), like=like).root
    found = bundles.resolve_bundle(args.bundle, atlas_set, None, args.fusion_model, args.finder_model)
    aset = AtlasSet(found.atlas_set)
    _check_segment_request(args, [0, *aset.labels])  # again, with the set's probability map names
    scans = [read_image(args.target[0], dtype=None, strict=args.strict), *args.target[1:]]  # before the models load
    reg_model = reg_model if reg_model is not None else found.reg_model
    if args.no_registration:
        reg_model = None
    elif reg_model is None:
        where = (args.bundle / bundles.BUNDLE_REG_MODEL) if args.bundle is not None else "--reg-model"
        raise CmmasError(where, "no registration network (not found): give --reg-model, or pass --no-registration "
                                "to fuse the affinely aligned atlases")
    explicit = learned_models(found.fusion_model)  # after the first scan is read: its error comes first
    networks = {**found.bundled, **explicit}
    config = segment_config(args, next(iter(explicit), None) or found.fusion, found.finder is not None)
    fusion_model = {config.fusion: networks[config.fusion]} if config.fusion in networks else None
    segmenter = Segmenter(aset, reg_model, fusion_model, config, progress=_progress(),
                          finder_model=found.finder)  # the models load once
    if args.no_registration:
        print("cmmas: segmenting without the registration network (--no-registration): the atlases are fused as "
              "affinely aligned", file=sys.stderr)
    for scan, out in zip(scans, outs):
        scan = scan if not isinstance(scan, Path) else read_image(scan, dtype=None, strict=args.strict)
        result = segmenter.segment(scan, alignment=args.transform)
        written = outputs.write_segmentation(result, out, extras=not args.no_extras, preview=args.preview)
        timing = ", ".join(f"{step} {s:.1f} s" for step, s in result.seconds.items())
        reasons = (["the alignment"] if result.alignment_flagged else []) + \
            ([f"doubtful {', '.join(result.doubtful)}"] if result.doubtful else [])
        flagged = f"; QC FLAGGED {' and '.join(reasons)}, see {written[-1]}" if reasons else ""
        print(f"wrote {written[0]} (+{len(written) - 1} files beside it) from {len(result.atlas_ids)} atlases "
              f"[{', '.join(result.atlas_ids)}] with {config.fusion}"
              f"{'' if reg_model is not None else ' (no registration network)'}; {timing}{flagged}", flush=True)


def _segment_batch(args) -> int:
    from cmmas.align import ants
    from cmmas.cohort import manifest as manifests
    from cmmas.cohort import run

    if args.merge:
        if args.shard or args.dask:
            raise CmmasError("--merge", "merges the records already in --out: give it without --shard or --dask")
        rows, failures, keys = run.merge_cohort(args.manifest, args.out, args.bundle, args.fusion,
                                                extras=not args.no_extras, preview=args.preview)
        print(f"cmmas segment-batch: {args.out / 'cohort.csv'}: {rows} scans; {args.out / 'failures.csv'}: "
              f"{failures} without a result")
        if keys > 1:
            print(f"cmmas segment-batch: warning: the rows come from {keys} different settings or bundles (column "
                  "key); give --bundle (and the shards' options) to keep only this run's", file=sys.stderr)
        return 1 if failures else 0
    for flag, value in (("--manifest", args.manifest), ("--bundle", args.bundle)):
        if value is None:
            raise CmmasError(flag, "required (except with --merge)")
    shard = manifests.parse_shard(args.shard) if args.shard else None
    if args.dask and shard:
        raise CmmasError("--dask", "give --dask or --shard, not both (Dask distributes the whole manifest)")
    if args.dask:
        from cmmas.cohort import dask_run

        summary = dask_run.segment_cohort_dask(args.manifest, args.bundle, args.out, args.dask, fusion=args.fusion,
                                               extras=not args.no_extras, preview=args.preview, strict=args.strict,
                                               report=None if args.quiet else print)
        print(f"cmmas segment-batch: {summary.line(args.out)}; cohort table {args.out / 'cohort.csv'}")
        return 1 if summary.failed else 0
    ants.set_threads(1)
    summary = run.segment_cohort(args.manifest, args.bundle, args.out, fusion=args.fusion, extras=not args.no_extras,
                                 preview=args.preview, shard_of=shard, strict=args.strict,
                                 report=None if args.quiet else print)
    print(f"cmmas segment-batch: {summary.line(args.out)}"
          + ("" if shard else f"; cohort table {args.out / 'cohort.csv'}"))
    return 1 if summary.failed else 0


def _register(args) -> None:
    from cmmas.register import apply

    written, stats = apply.register_files(
        args.moving, args.fixed, args.model, args.out_dir, moving_label=args.moving_label, spacing_zyx=args.spacing
    )
    for path in written:
        print(f"wrote {path}")
    print("jacobian: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))


COMMANDS = {"prepare-atlases": _prepare, "segment": _segment, "segment-batch": _segment_batch, "register": _register}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cmmas`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        status = COMMANDS[args.command](args)
    except CmmasError as err:
        print(f"cmmas: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"cmmas: error: {err}", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
