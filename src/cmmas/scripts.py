"""What every absl script in experiments/ and bench/ shares: its ``main`` and the flags with one
meaning everywhere (``--atlas_set``, ``--shape``, ``--spacing``).

Scripts parse flags and call the library; a bad input ends in one line on stderr
(``<script>: <file>: <problem>``) and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from absl import app, flags, logging

from cmmas.errors import CmmasError
from cmmas.provenance import provenance

FLAGS = flags.FLAGS


def absl_main(name: str, run: Callable[[], int]) -> Callable[[list[str]], int]:
    """An ``app.run`` main that rejects stray arguments and prints cmmas errors in one line.

    Args:
        name: the script's name, prefixed to error messages.
        run: the script's body, reading ``absl.flags.FLAGS``; returns the exit status.
    """

    def main(argv: list[str]) -> int:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        try:
            return run()
        except CmmasError as err:
            print(f"{name}: {err}", file=sys.stderr)
            return 1

    return main


def define_atlas_set(help_text: str) -> None:
    """``--atlas_set DIR`` (a prepared atlas set), with ``--space`` as its deprecated alias."""
    script = sys.argv[0]  # listed with the script's own flags in its --help
    flags.DEFINE_string("atlas_set", None, help_text, module_name=script)
    flags.DEFINE_string("space", None, "Deprecated alias of --atlas_set (removed in the next release).",
                        module_name=script)


def atlas_set_flag(required: bool = True) -> str | None:
    """The value of ``--atlas_set`` (or of the deprecated ``--space``, with a warning).

    Raises:
        CmmasError: both given with different values, or neither while ``required``.
    """
    if FLAGS.space is not None:
        logging.warning("--space is deprecated: use --atlas_set")
        if FLAGS.atlas_set is not None and FLAGS.atlas_set != FLAGS.space:
            raise CmmasError("--atlas_set", f"given twice: --atlas_set {FLAGS.atlas_set} and --space {FLAGS.space}")
    value = FLAGS.atlas_set if FLAGS.atlas_set is not None else FLAGS.space
    if value is None and required:
        raise CmmasError("--atlas_set", "required: the prepared atlas set's folder")
    return value


def define_labelled_targets() -> None:
    """``--labelled_targets K``: train with the first K labelled training targets only (the
    curve of how many labelled scans of the target modality a method needs)."""
    flags.DEFINE_integer("labelled_targets", 0, "Train with the first K labelled training targets of the target "
                         "modality only (0: all): how many labelled scans of that modality it takes.", lower_bound=0,
                         module_name=sys.argv[0])


def labelled_targets(ids: Sequence[str]) -> list[str]:
    """``ids`` cut to ``--labelled_targets`` (all when it is 0)."""
    return list(ids[: FLAGS.labelled_targets] if FLAGS.labelled_targets else ids)


def define_precision() -> None:
    """``--precision float32|mixed_bfloat16``: the trained network's trunk precision (:mod:`cmmas.nn.precision`)."""
    flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"], "Precision of the network's "
                      "convolutions in training: mixed_bfloat16 computes them in bfloat16 (faster on CPUs with "
                      "AVX-512 bfloat16), weights, heads, warps and losses stay float32; inference runs in float32 "
                      "either way.", module_name=sys.argv[0])


def define_training_pairs() -> None:
    """``--pairs cross|atlas_only`` and ``--labelmix P``: what a registration or SimNet network
    trains on (:data:`cmmas.nn.model_card.TRAINING_PAIRS`) and how often an image gets a random
    contrast from its label map (:mod:`cmmas.nn.labelmix`)."""
    flags.DEFINE_enum("pairs", "cross", ["cross", "atlas_only"], "cross: atlases x labelled training scans of "
                      "--target_modality; atlas_only: atlas-modality scans as targets too, each image given its own "
                      "random contrast (--labelmix): no labelled scan of the target modality used (SynthMorph's "
                      "setting).", module_name=sys.argv[0])
    flags.DEFINE_float("labelmix", None, "Probability, per image, of a random contrast drawn from its label map "
                       "(cmmas.nn.labelmix), each image independently (default 0; 1 with --pairs atlas_only).",
                       lower_bound=0.0, upper_bound=1.0, module_name=sys.argv[0])


def pair_targets(aset) -> tuple[str, list[str], float]:
    """The training targets that ``--pairs`` and ``--labelmix`` ask for in the prepared atlas set
    ``aset`` (:class:`cmmas.align.atlas_set.AtlasSet`): (their modality, their ids, the labelmix
    probability). cross: ``--target_modality``'s labelled training cases, cut by
    ``--labelled_targets``; atlas_only: ``--atlas_modality``'s, all of them.

    Raises:
        CmmasError: ``--pairs atlas_only`` with ``--labelmix 0``; labelmix on a z-scored (oracle)
            atlas set (the randomisation reads intensities in [0, 1]).
    """
    atlas_only = FLAGS.pairs == "atlas_only"
    labelmix = FLAGS.labelmix if FLAGS.labelmix is not None else float(atlas_only)
    if atlas_only and labelmix == 0:
        raise CmmasError("--labelmix", "--pairs atlas_only needs random contrasts (--labelmix > 0): without them "
                         "the network would learn the atlas modality against itself")
    if labelmix and aset.manifest.oracle:
        raise CmmasError("--labelmix", f"the atlas set {aset.root} is z-scored (oracle crops); the random contrasts "
                         "read intensities in [0, 1]: use a reference-mode atlas set")
    modality = FLAGS.atlas_modality if atlas_only else FLAGS.target_modality
    ids = list(aset.ids(modality, role="train", labelled=True))
    return modality, ids if atlas_only else labelled_targets(ids), labelmix


def _three(text: str | float, convert, flag: str, what: str) -> list:
    """One value or three comma-separated ones, converted; one value stands for all three axes."""
    try:
        parts = [convert(p) for p in str(text).split(",")]
    except ValueError:
        raise CmmasError(flag, f"expected {what}, got {text!r}") from None
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise CmmasError(flag, f"expected {what}, got {text!r}")
    return parts


def parse_shape(text: str | int) -> tuple[int, int, int]:
    """``--shape``, the working grid's size in voxels: ``"96"`` -> ``(96, 96, 96)``,
    ``"64,96,96"`` -> ``(64, 96, 96)`` (array order ``z, y, x``).

    Raises:
        CmmasError: not one or three positive integers.
    """
    parts = _three(text, int, "--shape", "one positive integer or three (D,H,W)")
    if min(parts) < 1:
        raise CmmasError("--shape", f"expected one positive integer or three (D,H,W), got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def parse_spacing(text: str | float, allow_zero: bool = False) -> tuple[float, float, float]:
    """``--spacing``, the working grid's voxel size in mm: ``"4"`` -> ``(4.0, 4.0, 4.0)``,
    ``"3,2,2"`` -> ``(3.0, 2.0, 2.0)`` (array order ``z, y, x``). With ``allow_zero``, ``"0"``
    gives ``(0, 0, 0)``: keep the scan's own grid.

    Raises:
        CmmasError: not one or three positive numbers (or 0 where allowed).
    """
    parts = _three(text, float, "--spacing", "one positive number or three (z,y,x, mm)")
    if min(parts) <= 0 and not (allow_zero and all(p == 0 for p in parts)):
        raise CmmasError("--spacing", f"expected one positive number or three (z,y,x, mm), got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def flag_config() -> dict:
    """The values of every flag the script defined or imported (absl's own flags left out)."""
    return {flag.name: flag.value for module, defined in FLAGS.flags_by_module_dict().items()
            if not module.startswith("absl") for flag in defined}


def command_line() -> str:
    """The command that ran this process: ``sys.argv`` joined by spaces."""
    return " ".join(sys.argv)


def write_bench_json(
    path: str | os.PathLike,
    rows: Sequence[Mapping],
    models: Mapping[str, str | os.PathLike] | None = None,
    data: str | os.PathLike | None = None,
    cases: Sequence[str] | None = None,
) -> Path:
    """Write a bench's JSON atomically: ``{"provenance": provenance(flag_config(), models, data,
    cases), "command": command_line(), "rows": rows}`` (``cmmas.evaluate.results_page`` reads it).

    Args:
        path: the JSON file (e.g. ``<out>/bench_mas.json``).
        rows: the bench's records, JSON types (anything else is written as its str).
        models: name -> model file, hashed with its card.
        data: the data folder.
        cases: the target ids measured.
    """
    from cmmas.io import atomic_write_text  # loads SimpleITK: not at every script's start

    record = {"provenance": provenance(flag_config(), models, data, cases), "command": command_line(),
              "rows": list(rows)}
    return atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")
