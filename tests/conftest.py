"""Shared fixtures: small real data from ../shared and a tiny real ESPnet Conformer."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def _pin_xdist_worker() -> None:
    """Give each pytest-xdist worker its own share of the cores (inherited by the recipes it starts, whose
    jobs size their threads by it): two workers each with every core's threads oversubscribe them."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
    if worker.startswith("gw") and 1 < count <= len(cores):
        share = len(cores) // count
        index = int(worker[2:])
        os.sched_setaffinity(0, cores[index * share:(index + 1) * share])


_pin_xdist_worker()  # before torch sizes its thread pool

import pytest
import torch
import yaml
from safetensors.torch import save_file

from pqm.families import record

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FSDD = SHARED / "corpora" / "fsdd"
WHISPER = SHARED / "models" / "whisper-tiny.en"
TINY_CONFIG = ROOT / "conf" / "tuning" / "train_conformer_tiny.yaml"
TOKENS = ["<blank>", "<unk>", "eight", "five", "four", "nine", "one", "seven", "six", "three", "two", "zero", "<sos/eos>"]


# tests/run.sh runs pytest-xdist workers with --dist loadgroup: each module is one group, so that
# its module-scoped fixtures (a recipe run) are built once; the modules that start the local Slurm
# cluster share one group, so that one worker runs it.
SLURM_GROUP = ("test_recipe.py", "test_slurm.py")
# The Slurm group's first test starts a job array that Slurm's time limit ends a minute or more later: the
# group's other tests run meanwhile (test_slurm.py: time_limited_array).
START_OF_SLURM_GROUP = "test_time_limited_array_is_submitted"
# The groups start in this order (tests/run.sh passes --no-loadscope-reorder): the longest first (the Slurm
# group, about 1,000 s of a 1,160 s run), then a short one to pair with it (each worker starts with two groups),
# then the other long ones, the longest first, so that the first worker to finish takes the short ones left;
# the rest in file order. Durations: CI of 2026-12-01.
FIRST = ("test_recipe.py", "test_recipes.py", "test_custom.py", "test_whisper.py", "test_tedlium3.py",
         "test_speechocean762.py", "test_adapt.py", "test_stages.py", "test_transcribe.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items) -> None:
    """Tests that use the local Slurm cluster are the ``slurm`` tier; every test gets its xdist group;
    the longest groups come first."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
        module = item.path.name
        item.add_marker(pytest.mark.xdist_group("slurm" if module in SLURM_GROUP else module))
    rank = {module: i for i, module in enumerate(FIRST)} | {"test_slurm.py": 0}
    items.sort(key=lambda item: (rank.get(item.path.name, len(FIRST)), item.name != START_OF_SLURM_GROUP))


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    if not (FSDD / "recordings").is_dir():
        pytest.fail(f"{FSDD} is absent: the FSDD copy in ../shared is needed")
    return FSDD


@pytest.fixture(scope="session")
def whisper_dir() -> Path:
    """The real whisper-tiny.en of ../shared (read-only: as a --pretrained source, or read directly)."""
    if not (WHISPER / "config.json").is_file():
        pytest.fail(f"{WHISPER} is absent: the Whisper tests need the real whisper-tiny.en there")
    return WHISPER


@pytest.fixture(scope="session")
def whisper_fp_dir(whisper_dir, tmp_path_factory) -> Path:
    """Stage 4 of the Whisper family once per test run: tiny.en exported as an ``fp`` model folder."""
    from pqm.families.whisper import export_pretrained

    out = tmp_path_factory.mktemp("whisper") / "fp"
    export_pretrained(str(whisper_dir), out)
    return out


def make_fsdd_subset(dst: Path, speakers: list[str], per_digit: int = 50) -> Path:
    """Copy a subset of FSDD (the real files) into ``dst/recordings``."""
    rec = dst / "recordings"
    rec.mkdir(parents=True)
    for spk in speakers:
        for digit in range(10):
            for index in range(per_digit):
                src = FSDD / "recordings" / f"{digit}_{spk}_{index}.wav"
                shutil.copy(src, rec / src.name)
    return dst


def build_tiny_fp_dir(out: Path, seed: int = 0) -> Path:
    """Write a randomly initialised tiny ESPnet Conformer as an ``fp`` model folder."""
    from espnet2.tasks.asr import ASRTask

    parser = ASRTask.get_parser()
    args = parser.parse_args(["--config", str(TINY_CONFIG), "--token_list", "x", "--token_type", "word",
                              "--frontend_conf", "fs=16k"])
    args.token_list = list(TOKENS)
    torch.manual_seed(seed)
    model = ASRTask.build_model(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=False), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    record(out, "conformer")
    return out


@pytest.fixture(scope="session")
def tiny_fp_dir(tmp_path_factory) -> Path:
    return build_tiny_fp_dir(tmp_path_factory.mktemp("tiny") / "fp")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Path:
    """A real single-node Slurm (Debian's slurm-wlm and munge) on localhost; yields its config file.

    Started by tools/slurm_localhost.sh, which installs the packages when it
    runs as root. Where it cannot start, the Slurm tests fail if
    PQM_REQUIRE_SLURM=1 (as in CI) and are skipped with the reason otherwise.
    """
    env = dict(os.environ, PQM_SLURM_DIR=str(tmp_path_factory.mktemp("slurm")))
    proc = subprocess.run(["bash", str(ROOT / "tools" / "slurm_localhost.sh"), "start"], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        reason = f"no local Slurm cluster: {proc.stderr.strip()}"
        if os.environ.get("PQM_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    conf = Path(env["PQM_SLURM_DIR"]) / "slurm.conf"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    yield conf
    subprocess.run(["bash", str(ROOT / "tools" / "slurm_localhost.sh"), "stop"], env=env, capture_output=True)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def write_cluster_config(path: Path, **fields) -> Path:
    """A cluster config for the local test cluster, with ``fields`` overriding the defaults."""
    cfg = {"partition": "debug", "time": "00:10:00", "mem": "1G", "cpus_per_task": 1, **fields}
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path
