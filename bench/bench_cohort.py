"""Cohort throughput: scans per hour of `cmmas segment-batch` on 1 and 2 Dask workers, against one
`cmmas segment --target ...` process over the same scans, in one call.

Runs, each a fresh process over the same --scans scans (the bundle's networks load once per
process or worker; the wall time includes that, as a user's run would):
  segment        `cmmas segment --target S1 ... SN --out DIR/` (TensorFlow's default threads: both cores)
  batch          `cmmas segment-batch` in one process (its per-scan overhead over `segment`)
  dask local:1   one single-threaded Dask worker
  dask local:2   two single-threaded Dask workers
Printed per run: wall seconds, scans per hour, the ratio of its scans per hour to `segment`'s and
the peak resident memory of its largest process (a Dask run: its largest worker). Nothing else
should run on the machine meanwhile.

Data: --bundle and a folder of scans (--scan_dir, every NIfTI in it, up to --scans), or by default
a phantom bundle (the phantom's CT atlas set on a 32^3 grid with an untrained BiRegNet: the
pipeline's cost without a trained network's) and --scans phantom MR scans.

Example:
  python bench/bench_cohort.py --scans 40 --out runs/bench_cohort
  python bench/bench_cohort.py --bundle runs/abdomen/bundle-ct2mr --scan_dir /data/mr --scans 20
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from cmmas.scripts import absl_main, write_bench_json

FLAGS = flags.FLAGS

flags.DEFINE_string("bundle", None, "Bundle to segment with (default: a phantom bundle made in --out).")
flags.DEFINE_string("scan_dir", None, "Folder of scans (*.nii.gz, *.nii, *.mha) to segment (default: phantom MR).")
flags.DEFINE_integer("scans", 40, "Scans to segment.", lower_bound=1)
flags.DEFINE_list("runs", ["segment", "batch", "dask:1", "dask:2"], "Runs, the first the reference.")
flags.DEFINE_string("fusion", "jlf_tf", "Fusion of every run.")
flags.DEFINE_string("out", "runs/bench_cohort", "Working folder (scans, bundle, outputs) and bench_cohort.json.")


def _phantom(out: Path, count: int) -> tuple[Path, list[Path]]:
    """A phantom bundle (CT atlas set on a 32^3 grid, untrained carded BiRegNet) and MR scans."""
    from cmmas import bundle
    from cmmas.align import cards, prepare
    from cmmas.datasets import phantom
    from cmmas.io import write_image
    from cmmas.nn import training
    from cmmas.nn.networks import build_biregnet

    made = out / "bundle"
    if not (made / bundle.README).exists():
        phantom.generate(out / "data", n=6, shape=48, modalities=("ct",))
        aset = prepare.prepare_atlases(out / "data", "ct", out / "atlas_set", layout="mmwhs", shape_zyx=(32,) * 3,
                                       progress=False)
        reg = training.save_model(build_biregnet((32,) * 3, c0=4), out / "reg.keras",
                                  cards.card_from_atlas_set(aset, "biregnet", "ct", "mr"))
        bundle.write_bundle(aset.root, reg, made)
    scans = []
    for k in range(count):
        path = out / "scans" / f"mr_{k:03d}.nii.gz"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_image(phantom.make_subject("mr", 500 + k, shape=48)[0], path)
        scans.append(path)
    return made, scans


#: Runs a command and prints, last, the largest peak resident memory (KiB) of its processes.
_PEAK = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")


def _command(run: str, bundle: Path, scans: list[Path], manifest: Path, out: Path) -> list[str]:
    cmmas = [sys.executable, "-m", "cmmas.cli"]
    if run == "segment":
        return [*cmmas, "segment", "--bundle", str(bundle), "--target", *map(str, scans), "--out", f"{out}/",
                "--fusion", FLAGS.fusion]
    extra = ["--dask", f"local:{run.split(':')[1]}"] if run.startswith("dask:") else []
    return [*cmmas, "segment-batch", "--manifest", str(manifest), "--bundle", str(bundle), "--out", str(out),
            "--fusion", FLAGS.fusion, "--quiet", *extra]


def _run() -> int:
    out = Path(FLAGS.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if bool(FLAGS.bundle) != bool(FLAGS.scan_dir):
        from cmmas.errors import CmmasError

        raise CmmasError("--bundle" if FLAGS.scan_dir else "--scan_dir", "give --bundle and --scan_dir together "
                         "(or neither: the phantom)")
    if FLAGS.bundle:
        bundle = Path(FLAGS.bundle)
        found = sorted(p for p in Path(FLAGS.scan_dir).iterdir() if p.name.endswith((".nii.gz", ".nii", ".mha")))
        scans = found[: FLAGS.scans]
    else:
        bundle, scans = _phantom(out, FLAGS.scans)
    manifest = out / "manifest.csv"
    manifest.write_text("id,path\n" + "".join(f"s{k:04d},{p.resolve()}\n" for k, p in enumerate(scans)))
    rows = []
    print(f"bench_cohort: {len(scans)} scans, bundle {bundle}, fusion {FLAGS.fusion}")
    print(f"{'run':<10}{'wall s':>9}{'scans/h':>10}{'x ref':>7}{'peak MB':>9}")
    for run in FLAGS.runs:
        target = out / f"out-{run.replace(':', '')}"
        subprocess.run(["rm", "-rf", str(target)], check=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _PEAK, *_command(run, bundle, scans, manifest, target)],
                              capture_output=True, encoding="utf-8")
        wall = time.perf_counter() - start
        if done.returncode != 0:
            print(f"bench_cohort: {run} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        peak = int(done.stdout.strip().splitlines()[-1]) / 1024
        row = {"run": run, "scans": len(scans), "wall_s": wall, "scans_per_hour": len(scans) * 3600 / wall,
               "peak_mb": peak}
        reference = [r for r in rows if r["run"] == FLAGS.runs[0]] or ([row] if run == FLAGS.runs[0] else [])
        row["ratio"] = row["scans_per_hour"] / reference[0]["scans_per_hour"] if reference else None
        rows.append(row)
        ratio = f"{row['ratio']:>7.2f}" if reference else f"{'-':>7}"
        print(f"{run:<10}{wall:>9.1f}{row['scans_per_hour']:>10.0f}{ratio}{peak:>9.0f}")
    print(f"bench_cohort: {write_bench_json(out / 'bench_cohort.json', rows, data=str(bundle))}")
    return 0


if __name__ == "__main__":
    app.run(absl_main("bench_cohort", _run))
