"""How much speech a speaker needs: WER of the per-speaker systems against minutes of adaptation speech.

``local/data_amounts.sh EXPDIR 1 2 5 10`` runs stages 7-9 again for each amount N, with ``--sa-utts N``
(each test speaker's first N adaptation utterances), in ``EXPDIR/amounts/sa_utts<N>``, on the
experiment's own NF4 model and SAT adapter. This gathers their ``results.json`` and the experiment's
own (all adaptation utterances) into ``EXPDIR/data_amounts.json``, ``RESULTS_data_amounts.md`` and
``wer_vs_data.png``: one line per per-speaker system against the mean minutes of adaptation speech
per speaker, with the systems that use none (``fp``, ``nf4``, ``nf4_sat``) as flat lines.

    python -m pqm.data_amounts --expdir EXPDIR
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from pqm.errors import BadInput, cli, setup_logging
from pqm.files import atomic_path, read_json, write_json, write_text
from pqm.systems import ADAPTED, SYSTEMS

NO_ADAPTATION = tuple(s for s in SYSTEMS if s not in ADAPTED)
RUNS = "amounts"


def gather(expdir: Path) -> list[dict]:
    """One row per amount (fewest first; the experiment's own, all utterances, last): utterances and minutes
    per speaker, and the WER of every system."""
    runs = [expdir, *sorted((expdir / RUNS).glob("sa_utts*"))]
    rows = []
    for run in runs:
        if not (run / "results.json").exists():
            continue
        results = read_json(run / "results.json")
        if "adaptation" not in results:
            raise BadInput(f"{run}/results.json does not say how much adaptation speech there was: "
                           "rerun its stage 9 (./run.sh --stage 9 with its options)")
        rows.append({"run": str(run), **results["adaptation"],
                     "wer": {name: r["wer"] for name, r in results["systems"].items()}})
    if not any(r["utterances_per_speaker"] for r in rows):
        raise BadInput(f"no run with fewer adaptation utterances under {expdir / RUNS}: run local/data_amounts.sh")
    return sorted(rows, key=lambda r: r["utterances_per_speaker"] or math.inf)


def held_out(row: dict, system: str) -> int:
    """The adaptation utterances per speaker that ``system`` did not train on in ``row``'s run (``--sa-holdout``;
    ``pqm_unsup`` trains on all of them: its own ``--unsup-holdout`` is not counted here)."""
    return row.get("held_out_per_speaker", 0) if ADAPTED[system].targets == "transcripts" else 0


def markdown(rows: list[dict]) -> str:
    systems = [s for s in (*ADAPTED, *NO_ADAPTATION) if any(s in r["wer"] for r in rows)]
    lines = ["| utterances per speaker | held out | minutes per speaker | " + " | ".join(systems) + " |",
             "|---:|---:|---:|" + "---:|" * len(systems)]
    for r in rows:
        wers = [f"{r['wer'][s]:.2f}" if r["wer"].get(s) is not None else "-" for s in systems]
        lines.append(f"| {r['utterances_per_speaker'] or 'all'} | {r.get('held_out_per_speaker', 0)} | "
                     f"{r['minutes_per_speaker']:.2f} | "
                     + " | ".join(wers) + " |")
    return ("WER (%) by the amount of adaptation speech per test speaker (held out: the last of them, kept to "
            "judge the transcribed adapters, not trained on; `pqm_unsup` trains on all)\n\n" + "\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ADAPTED:
        colour = None
        held = sorted({held_out(r, name) for r in rows})
        for h in held:  # a line per held-out setting: holding out changes what is trained on, and what is kept
            points = [(r["minutes_per_speaker"], r["wer"][name]) for r in rows
                      if r["wer"].get(name) is not None and held_out(r, name) == h]
            if points:
                label = name + (f" ({h} held out)" if h else "") if len(held) > 1 else name
                line, = ax.plot(*zip(*points), marker="o" if h == held[0] else "s", color=colour,
                                linestyle="-" if h == held[0] else "none", label=label)
                colour = line.get_color()
    for name, style in zip(NO_ADAPTATION, (":", "--", "-.")):
        if rows[-1]["wer"].get(name) is not None:
            ax.axhline(rows[-1]["wer"][name], linestyle=style, color="grey", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("adaptation speech per speaker (minutes)")
    ax.set_ylabel("WER (%)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--expdir", type=Path, required=True)
    a = p.parse_args(argv)
    setup_logging()
    rows = gather(a.expdir)
    results = read_json(a.expdir / "results.json")
    write_json(a.expdir / "data_amounts.json", rows)
    table = markdown(rows)
    write_text(a.expdir / "RESULTS_data_amounts.md", table)
    plot(rows, a.expdir / "wer_vs_data.png", f"{results['corpus']} / {results['model']}")
    print(table)
    for name in ("data_amounts.json", "RESULTS_data_amounts.md", "wer_vs_data.png"):
        print(f"wrote {a.expdir / name}")


if __name__ == "__main__":
    cli(main)
