"""Clinical-size scans: `cmmas segment` on a 512 x 512 x 600 CT and a 512 x 512 x 200 MR, against
the shared (original-size) scans they are made from.

The large scans are built once from the shared data (--data) and kept in --scans: the CT case
--ct_case resampled (linear) onto a 0.7 mm isotropic grid of 512 x 512 x --ct_slices, and the MR
case --mr_case onto 512 x 512 x --mr_slices at 0.8 mm in plane, its slices spanning the scan's
own z extent (a 0.8 mm isotropic grid of 200 slices would cut the upper abdomen off at 160 mm);
both centred on the scan's centre, in its orientation, stored as int16 .nii.gz (--scan_format:
or uncompressed .nii / .mha) with air/background outside the scan. Each scan is segmented by the atlas set (--atlas_set, one per direction, as
bench_mas) whose atlases are of the other modality, with --fusion; without --reg_model an
untrained BiRegNet at the set's grid (the identity: its time is counted, its fields are zero).

Each (scan, mode) runs in a fresh process (bench_mas._in_fresh_process), as `cmmas segment` does:
setup (imports, models, one warm-up pass: printed apart), then --repeats times: read the scan
(its own dtype), Segmenter.segment (align, register, fuse, map back), write the outputs
(cmmas.outputs.write_segmentation, in --format). Modes: "label" (`--no-extras`: the label map,
volumes and QC only) and "maps" (the probability and agreement maps too). Printed per row: the
median seconds of each step and of read + segment + write ("wall"), the process's peak resident
memory (setup included, as a CLI process holds it), the ratio of the wall time against the
original-size scan of the same mode (the reference run); then, per organ, the Dice between the
large scan's label (resampled nearest-neighbour onto the original scan's grid) and the original
scan's label, and whether the issue's goals hold (large CT: label <= 8 s and 2.5 GB, maps <= 12 s
and 3 GB; Dice >= 0.98 per organ). --out gets bench_large.md (the printed report) and
bench_large.json ({"provenance", "command", "rows": one per scan and mode: median seconds per step,
peak MB, setup seconds, wall against the original scan}).

Example (atlas sets as in bench_alignment's docstring):
  python bench/bench_large.py \
      --atlas_set runs/bench_alignment/mr_atlases,runs/bench_alignment/ct_atlases \
      --out runs/bench_large
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from absl import app, flags

from bench_mas import FLAGS, _in_fresh_process  # also defines --data, --atlas_set, ... (used here)
from cmmas.scripts import absl_main, write_bench_json

flags.DEFINE_string("ct_case", "ct_00", "CT case of --data to enlarge.")
flags.DEFINE_string("mr_case", "mr_01", "MR case of --data to enlarge.")
flags.DEFINE_integer("ct_slices", 600, "Slices of the large CT (0.7 mm isotropic, 512 x 512 in plane).", lower_bound=1)
flags.DEFINE_integer("mr_slices", 200, "Slices of the large MR (0.8 mm in plane, 512 x 512).", lower_bound=1)
flags.DEFINE_list("modalities", ["ct", "mr"], "Which targets to run: ct, mr.")
flags.DEFINE_list("modes", ["label", "maps"], "label: --no-extras; maps: with the probability and agreement maps.")
flags.DEFINE_string("fusion", "mv", "Fusion of segment() (a learned one needs its network in --fusion_model).")
flags.DEFINE_enum("format", "nii.gz", ["nii.gz", "nii", "mha"], "Format of the written images.")
flags.DEFINE_string("scans", None, "Folder of the large scans (built when missing); default <out>/scans.")
flags.DEFINE_enum("scan_format", "nii.gz", ["nii.gz", "nii", "mha"],
                  "Format the large scans are stored (and read) in: nii.gz (gzip, decompressed on one thread) "
                  "or uncompressed nii / mha (what reading costs without the decompression).")

#: In-plane size, spacing (mm) and slices flag of each large scan.
LARGE = {"ct": (512, 0.7, "ct_slices"), "mr": (512, 0.8, "mr_slices")}
#: The issue's goals for the large CT: (seconds, peak MB) per mode, and the Dice per organ.
GOALS = {"label": (8.0, 2560.0), "maps": (12.0, 3072.0)}
GOAL_DICE = 0.98


def _peak_mb() -> float:
    """Peak resident memory of this process, MB: VmHWM, which starts afresh at exec (ru_maxrss would
    carry over the parent's peak into a spawned process)."""
    with open("/proc/self/status") as handle:
        line = next(row for row in handle if row.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024.0


def large_scan(source: Path, modality: str, slices: int, out: Path) -> Path:
    """``source`` resampled onto the large grid of :data:`LARGE` (module docstring), int16, at ``out``
    (built once)."""
    if out.exists():
        return out
    import numpy as np

    from cmmas import preprocess
    from cmmas.io import read_image, write_image

    image = read_image(source)
    size, spacing, _ = LARGE[modality]
    extent_z = image.geometry.size[2] * image.geometry.spacing[2]
    spacing_zyx = (spacing if modality == "ct" else extent_z / slices, spacing, spacing)
    grid = preprocess.working_geometry(preprocess.physical_center(image.geometry), spacing_zyx, (slices, size, size),
                                       direction=image.geometry.direction)
    moved = preprocess.resample(image, geometry=grid, kind="linear", default=float(image.array.min()))
    return write_image(moved.with_array(np.rint(moved.array).astype(np.int16)), out, compress=out.name.endswith(".gz"))


def run_scan(scan: str, atlas_set: str, reg_model: str | None, fusion_model: list[str] | None, fusion: str,
             atlases: int, batch_size: int, maps: bool, repeats: int, out: str, alignment: str) -> dict:
    """In this process: setup, then ``repeats`` timed read + segment + write of ``scan`` (module
    docstring); the seconds of each step (median), the peak memory (MB) and the label's path.
    ``alignment``: a folder the scan's alignment is kept in, or, when it holds one already
    (``affine.mat``), the alignment used instead of aligning."""
    start = time.perf_counter()
    import ants  # noqa: F401  (imported in the setup, as the CLI's first registration would)

    from cmmas import outputs, segment
    from cmmas.fuse import registry
    from cmmas.align import ants as cmmas_ants
    from cmmas.align.atlas_set import AtlasSet
    from cmmas.io import read_image

    cmmas_ants.set_threads(1)  # as `cmmas segment` (deterministic)
    aset = AtlasSet(atlas_set)
    if reg_model is None:
        from cmmas.nn.networks import build_biregnet

        reg_model = build_biregnet(aset.geometry.shape)
    engine = segment.Segmenter(aset, reg_model, fusion_model if fusion in registry.LEARNED else None,
                               segment.SegmentConfig(fusion=fusion, atlases=atlases, batch_size=batch_size, maps=maps))
    engine.warm_up()
    found = {"setup": time.perf_counter() - start, "steps": []}
    given = [Path(alignment) / "affine.mat"] if (Path(alignment) / "affine.mat").exists() else None
    for _ in range(repeats):
        t0 = time.perf_counter()
        target = read_image(scan, dtype=None)
        steps = {"read": time.perf_counter() - t0}
        result = engine.segment(target, transform_dir=alignment, alignment=given)
        steps.update({k: result.seconds[k] for k in ("align", "register", "fuse", "map_back")})
        t0 = time.perf_counter()
        written = outputs.write_segmentation(result, out, extras=maps)
        steps["write"] = time.perf_counter() - t0
        steps["wall"] = steps["read"] + result.seconds["total"] + steps["write"]
        found["steps"].append(steps)
        del result, target
    found["label"] = str(written[0])
    found["peak_mb"] = _peak_mb()
    return found


def _atlas_sets() -> dict[str, tuple[str, str | None]]:
    """Target modality -> (atlas set, BiRegNet) of the other modality."""
    from cmmas.align.atlas_set import AtlasSet

    found = {}
    for n, path in enumerate(FLAGS.atlas_set or []):
        aset = AtlasSet(path)
        atlases = aset.case(aset.manifest.reference).modality
        model = FLAGS.reg_model[n] if n < len(FLAGS.reg_model) else None
        found["mr" if atlases == "ct" else "ct"] = (path, model)
    return found


def _dice(label: str, reference: str, labels: dict) -> dict[int, float]:
    """Dice per organ of a label map, resampled (nearest neighbour) onto ``reference``'s grid, against it."""
    from cmmas import preprocess
    from cmmas.evaluate.alignment import organ_dice
    from cmmas.io import read_label

    truth = read_label(reference)
    moved = preprocess.resample(read_label(label), geometry=truth.geometry, kind="nearest")
    return organ_dice(moved.array, truth.array, [0, *labels])


def _describe(dice: dict[int, float], labels: dict) -> str:
    return ", ".join(f"{labels[c]} {d:.3f}" for c, d in dice.items())


def _run() -> int:
    from cmmas.align.atlas_set import AtlasSet
    from cmmas.errors import CmmasError

    if not FLAGS.out:
        raise CmmasError(None, "--out is required (the large scans and the outputs go there)")
    out = Path(FLAGS.out)
    scans = Path(FLAGS.scans) if FLAGS.scans else out / "scans"
    sets = _atlas_sets()
    table = [f"{'scan':<26} {'mode':<6} {'read':>5} {'align':>6} {'reg':>5} {'fuse':>5} {'back':>5} {'write':>6} "
             f"{'wall s':>7} {'peak MB':>8} {'x orig':>7}"]
    lines, ok, records = [], True, []
    for modality in FLAGS.modalities:
        if modality not in sets:
            raise CmmasError(None, f"no atlas set of the other modality for {modality} targets in --atlas_set")
        atlas_set, reg_model = sets[modality]
        case = FLAGS.ct_case if modality == "ct" else FLAGS.mr_case
        original = Path(FLAGS.data) / modality / f"{case}_image.nii.gz"
        slices = getattr(FLAGS, LARGE[modality][2])
        large = _in_fresh_process(large_scan, original, modality, slices,  # its memory is not the runs'
                                  scans / f"{case}_{LARGE[modality][0]}x{slices}.{FLAGS.scan_format}")
        truth = Path(FLAGS.data) / modality / f"{case}_label.nii.gz"
        labels = AtlasSet(atlas_set).labels
        for n, mode in enumerate(FLAGS.modes):
            runs = {}
            for folder in (out / mode).glob(f"{case}_*_alignment"):
                shutil.rmtree(folder)  # aligned afresh in every run
            # the large scan lies in the original's physical space: aligned as the original was, it
            # shows what the size alone changes (the first mode only)
            variants = [("original", original, "original"), ("large", large, "large")]
            variants += [("large, orig. align", large, "original")] if n == 0 else []
            for name, scan, aligned in variants:
                label_out = out / mode / f"{case}_{name.replace(', ', '_').replace('.', '').replace(' ', '_')}" \
                    f".{FLAGS.format}"
                runs[name] = _in_fresh_process(
                    run_scan, str(scan), atlas_set, reg_model,
                    FLAGS.fusion_model[0].split("+") if FLAGS.fusion_model else None,
                    FLAGS.fusion, FLAGS.atlases, FLAGS.batch_size, mode == "maps", FLAGS.repeats, str(label_out),
                    str(out / mode / f"{case}_{aligned}_alignment"))
                steps = {k: statistics.median(s[k] for s in runs[name]["steps"]) for k in runs[name]["steps"][0]}
                runs[name]["median"] = steps
                ratio = steps["wall"] / runs["original"]["median"]["wall"]
                table.append(f"{case + ' ' + name:<26} {mode:<6} {steps['read']:>5.2f} {steps['align']:>6.2f} "
                             f"{steps['register']:>5.2f} {steps['fuse']:>5.2f} {steps['map_back']:>5.2f} "
                             f"{steps['write']:>6.2f} {steps['wall']:>7.2f} {runs[name]['peak_mb']:>8.0f} "
                             f"{ratio:>6.2f}x")
                print(table[-1] + f"   (setup {runs[name]['setup']:.1f} s)", flush=True)
                records.append({"case": case, "modality": modality, "mode": mode, "scan": name, "seconds": steps,
                                "peak_mb": runs[name]["peak_mb"], "setup_seconds": runs[name]["setup"],
                                "x_original": ratio})
            dice = _dice(runs["large"]["label"], runs["original"]["label"], labels)
            agree = all(d >= GOAL_DICE for d in dice.values())
            lines.append(f"{case} {mode}: Dice large vs original per organ {_describe(dice, labels)}"
                         + ("" if agree else f"  BELOW {GOAL_DICE}"))
            ok &= agree
            if "large, orig. align" in runs:
                same = _dice(runs["large, orig. align"]["label"], runs["original"]["label"], labels)
                lines.append(f"{case} {mode}: the same, both aligned as the original: {_describe(same, labels)}")
            for name, run in runs.items():
                lines.append(f"{case} {mode}: Dice {name} vs truth: {_describe(_dice(run['label'], truth, labels), labels)}")
            if modality == "ct":
                seconds, peak = GOALS[mode]
                met = runs["large"]["median"]["wall"] <= seconds and runs["large"]["peak_mb"] <= peak
                lines.append(f"{case} {mode}: goal <= {seconds:g} s and <= {peak:.0f} MB "
                             + ("met" if met else "NOT met"))
                ok &= met
    report = "\n".join(table + [""] + lines)
    print("\n" + report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_large.md").write_text(f"```\n{report}\n```\n")
    models = {f"reg_model_{m}_targets": model for m, (_, model) in sets.items() if model}
    write_bench_json(out / "bench_large.json", records, models=models, data=FLAGS.data,
                     cases=[FLAGS.ct_case if m == "ct" else FLAGS.mr_case for m in FLAGS.modalities])
    return 0 if ok else 2


def main(argv: list[str]) -> int:
    return absl_main("bench_large", _run)(argv)


if __name__ == "__main__":
    app.run(main)
