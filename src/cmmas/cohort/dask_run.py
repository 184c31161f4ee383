"""A cohort on Dask workers (``cmmas segment-batch --dask ADDRESS|local:N``): the scans of a
manifest not done yet are mapped over a ``dask.distributed`` cluster, each worker process loading
the bundle's networks once (cached per process) and running the same per-scan step as a single
process (:func:`cmmas.cohort.batch.run_scans` on one scan), so outputs, records and failures are
identical. A task that raises is retried once (``retries``); a scan whose worker keeps dying
(the scheduler's ``allowed-failures``) is recorded as failed with Dask's reason and the run goes on. ``local:N`` starts a ``LocalCluster`` of N
single-threaded worker processes (TensorFlow and ANTs on one thread each); its dashboard address
is printed. dask[distributed] is an optional extra (``pip install cmmas[dask]``; ``make install``
installs it).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cmmas.cohort import batch
from cmmas.cohort.manifest import Scan, read_manifest
from cmmas.errors import CmmasError

if TYPE_CHECKING:
    from distributed import Client

#: Per worker process: (bundle, fusion, options, run key) -> the bundle's ``segment_one``.
_SEGMENTERS: dict[tuple, Callable] = {}


def _threads_one() -> None:
    """One thread for TensorFlow and ANTs in this process (before TensorFlow runs anything)."""
    import tensorflow as tf

    from cmmas.align import ants

    ants.set_threads(1)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already initialised in this process: keep its threads
        pass


def segment_on_worker(scan: Scan, bundle: str, fusion: str | None, extras: bool, preview: bool, strict: bool,
                      out: str, run_key: str, single_thread: bool) -> tuple[str, bool, str | None]:
    """One scan, on a Dask worker: ``(id, segmented, failure reason or None)`` (``run_key``: the
    run's :func:`cmmas.cohort.batch.run_key`; Dask's ``map`` keeps ``key`` for its own)."""
    from cmmas.cohort import run

    cache = (bundle, fusion, extras, preview, strict, run_key)
    if cache not in _SEGMENTERS:
        _SEGMENTERS.clear()  # a bundle rebuilt at the same path: its old networks go
        if single_thread:
            _threads_one()
        plan = run.plan_bundle(bundle, fusion, maps=extras, preview=preview)
        _SEGMENTERS[cache] = run.segmenter_of(run.open_bundle(plan), extras, preview, strict)
    summary = batch.run_scans([scan], _SEGMENTERS[cache], out, run_key, report=None)
    failure = batch.read_failure(Path(out), scan.id) if summary.failed else None
    return scan.id, not summary.failed, failure


@contextlib.contextmanager
def dask_client(address: str) -> Iterator[Client]:
    """A ``distributed.Client`` of a scheduler address, or of a new ``LocalCluster`` for
    ``local:N`` (N single-threaded worker processes, closed on exit).

    Raises:
        CmmasError: dask.distributed is not installed, or ``local:N`` with N < 1.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise CmmasError("--dask", "dask.distributed is not installed: pip install 'cmmas[dask]' "
                                   "(make install installs it)") from None
    local = re.fullmatch(r"local:(\d+)", address)
    if address.startswith("local") and not (local and int(local.group(1)) >= 1):
        raise CmmasError("--dask", f"expected a scheduler address or local:N with N >= 1, got {address!r}")
    if not local:
        with Client(address) as client:
            yield client
        return
    with LocalCluster(n_workers=int(local.group(1)), threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        yield client


def segment_cohort_dask(manifest: str | os.PathLike, bundle: str | os.PathLike, out: str | os.PathLike,
                        address: str, fusion: str | None = None, extras: bool = True, preview: bool = False,
                        strict: bool = False, report: Callable[[str], None] | None = print,
                        retries: int = 1) -> batch.Summary:
    """Segment a manifest on Dask workers, then write the cohort tables (:func:`batch.merge`).

    Raises:
        CmmasError: a bad manifest, bundle or address, or an output that would replace an input.
    """
    from distributed import as_completed

    from cmmas.cohort import run

    scans = read_manifest(manifest)
    run.check_inputs_kept(manifest, scans, out)
    Path(out).mkdir(parents=True, exist_ok=True)
    plan = run.plan_bundle(bundle, fusion, maps=extras, preview=preview)
    todo = [scan for scan in scans if not batch.is_done(out, scan, plan.key)]
    failed = []
    with dask_client(address) as client:
        if report:
            report(f"dask: {len(client.scheduler_info()['workers'])} workers, dashboard {client.dashboard_link}; "
                   f"{len(scans) - len(todo)} of {len(scans)} scans already done")
        futures = client.map(segment_on_worker, todo, bundle=str(Path(bundle).resolve()), fusion=fusion,
                             extras=extras, preview=preview, strict=strict, out=str(Path(out).resolve()),
                             run_key=plan.key, single_thread=address.startswith("local:"), pure=False, retries=retries)
        owner = dict(zip(futures, todo))
        for k, future in enumerate(as_completed(futures), start=1):
            try:
                scan_id, done, reason = future.result()
            except Exception as err:  # the task itself failed (a worker lost on it, the bundle unreadable there)
                scan = owner[future]
                scan_id, done, reason = scan.id, False, batch.reason_of(err)
                batch.record_failure(out, scan, plan.key, reason)
            if not done:
                failed.append(scan_id)
            if report:
                report(f"[{k}/{len(todo)}] {scan_id}: {'ok' if done else f'FAILED: {reason}'}")
    batch.merge(out, scans, plan.key)
    return batch.Summary(len(todo) - len(failed), len(scans) - len(todo), failed)
