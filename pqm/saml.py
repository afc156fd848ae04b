"""``saml``: a mixture of LoRA experts, routed per utterance, for speakers with no adaptation data.

Made in stage 6 after SAT when ``--saml-experts K`` > 0 (SAML, arXiv 2406.19706, in its per-utterance form):

1. ``python -m pqm.saml groups``: the training speakers in at most K groups, one expert each: one speaker a
   group where there are K or fewer, else k-means over each speaker's mean NF4 encoder output (no adapter).
   Writes ``<saml>/groups.json`` (expert -> speakers) and each group's cuts, ``<saml>/cuts/<expert>.jsonl.gz``.
2. ``python -m pqm.adapt --init <sat> --cuts <saml>/cuts/<expert>.jsonl.gz --out <saml>/experts/<expert>``
   (run.sh): each expert a LoRA started from SAT, trained on its group, in peft's format.
3. ``python -m pqm.saml router``: a linear layer from an utterance's mean NF4 encoder output (no adapter) to a
   softmax over the experts, trained on all training cuts (their targets in the experts' ``target_style``)
   with the experts frozen. Every expert is active in every LoRA layer, its output times the utterance's
   weight (:class:`pqm.lora.RowAdapters`). Writes
   ``<saml>/router.safetensors`` and ``<saml>/router.json`` (experts, base fingerprint, losses, size).

With ``groups --sat-expert <sat>`` the SAT adapter is one more expert, ``sat`` (a copy, of no group), and with
``router --hold-out-own-expert`` each training utterance is routed as a test speaker's would be: without the
expert of its own speaker's group (batches of one group each), so the router learns what to do for a speaker
no expert has heard, among the other groups' experts and SAT (run.sh ``--saml-router-holdout true``).

Stage 8's ``saml`` system (:class:`pqm.mixture.Mixture`) routes each evaluation utterance and decodes it through its
mixture; the test speaker's adaptation data is never read. Stage 7's ``saml_sa`` starts each speaker's adapter from
the experts merged at the mean of the router's weights over the speaker's adaptation audio.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from lhotse import CutSet
from safetensors.torch import save_file
from tqdm import tqdm

from pqm.adapt import (StepTimer, add_speed_perturb_option, check_speed_perturb, fp_hypotheses_cache, freeze_batchnorm,
                       styled_targets)
from pqm.batches import speed_perturbed
from pqm.errors import BadInput, cli, require, setup_logging
from pqm.families import family
from pqm.files import atomic_path, file_digest, ids_digest, read_json, write_json
from pqm.lora import META, RowAdapters
from pqm.mixture import GROUPS, MADE_BY, ROUTER, ROUTER_META, Mixture, base_net, encoder_means
from pqm.nf4 import to_nf4


SAT_EXPERT = "sat"  # the SAT adapter as an expert of no group (groups --sat-expert)


def expert_names(k: int) -> list[str]:
    """Expert folder names: numbered, never built from a speaker id."""
    return [f"expert{i + 1:02d}" for i in range(k)]


def copy_sat_expert(sat_dir: Path, saml_dir: Path) -> None:
    """The SAT adapter's files as the expert ``sat`` (``<saml>/experts/sat``)."""
    with atomic_path(saml_dir / "experts" / SAT_EXPERT) as tmp:
        tmp.mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json", META):
            shutil.copy2(require(sat_dir / name, "stage 6 (SAT)"), tmp / name)


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 50) -> list[int]:
    """Lloyd's k-means (k-means++ start) of the rows of ``points``: each row's cluster, clusters numbered by
    their first row, none empty."""
    gen = torch.Generator().manual_seed(seed)
    centres = points[torch.randint(len(points), (1,), generator=gen)]
    while len(centres) < k:
        d2 = torch.cdist(points, centres).min(1).values ** 2
        centres = torch.cat([centres, points[torch.multinomial(d2, 1, generator=gen)]])
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(1)
        centres = torch.stack([points[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
    assign = torch.cdist(points, centres).argmin(1).tolist()
    order = list(dict.fromkeys(assign))
    return [order.index(j) for j in assign]


def nf4_recognizer(a: argparse.Namespace):
    """The family's recognizer with its model made NF4 (stage 5); returns it and the base fingerprint."""
    rec = family(a.fp_dir).recognizer(a.fp_dir, a.device, 1, 0.5)
    rec.set_window(a.window)
    return rec, to_nf4(rec.model, a.nf4_dir, device=a.device)


def groups(a: argparse.Namespace) -> None:
    """Step 1: the training speakers' groups and each group's cuts."""
    cuts = CutSet.from_file(require(a.cuts, "stage 2 (manifests)")).to_eager()
    speakers = sorted({c.supervisions[0].speaker for c in cuts})
    if not speakers:
        raise BadInput(f"{a.cuts} holds no training utterances: rerun stage 2 (manifests)")
    k = min(a.experts, len(speakers))
    key = {"cuts": ids_digest(c.id for c in cuts), "experts": k, "nf4": read_json(a.nf4_dir / "nf4.json")["fingerprint"],
           **({} if k == len(speakers) else {"max_utts_per_speaker": a.max_utts_per_speaker, "seed": a.seed}),
           **({"sat_expert": file_digest(require(a.sat_expert / "adapter_model.safetensors", "stage 6 (SAT)"))}
              if a.sat_expert else {})}
    done = a.saml_dir / GROUPS
    sat_copied = not a.sat_expert or (a.saml_dir / "experts" / SAT_EXPERT).is_dir()
    if done.exists() and read_json(done).get("run_key") == key and (a.saml_dir / "cuts").is_dir() and sat_copied:
        logging.info(f"{done} was already made from these cuts and settings: nothing to do")
        return
    if k == len(speakers):
        assign, how = list(range(k)), "one training speaker an expert"
    else:
        rec, _ = nf4_recognizer(a)
        by_speaker = {s: [c for c in cuts if c.supervisions[0].speaker == s][: a.max_utts_per_speaker] for s in speakers}
        points = torch.stack([encoder_means(rec, family(a.fp_dir), by_speaker[s], s).mean(0) for s in speakers])
        assign = kmeans(torch.nn.functional.normalize(points, dim=1), k, a.seed)
        how = (f"k-means (k={k}) over each speaker's mean NF4 encoder output of at most "
               f"{a.max_utts_per_speaker} utterances, unit length")
    names = expert_names(len(set(assign)))  # k-means may leave a cluster empty: no expert for it
    members = {name: [s for s, j in zip(speakers, assign) if j == i] for i, name in enumerate(names)}
    with atomic_path(a.saml_dir / "cuts") as tmp:
        tmp.mkdir()
        for name, group in members.items():
            cuts.filter(lambda c, group=set(group): c.supervisions[0].speaker in group).to_file(tmp / f"{name}.jsonl.gz")
    if a.sat_expert:
        copy_sat_expert(a.sat_expert, a.saml_dir)
        members[SAT_EXPERT] = []
    write_json(done, {"experts": members, "how": how, "cuts": str(a.cuts), "run_key": key})
    for name, group in members.items():
        logging.info(f"{name}: {len(group)} speakers ({', '.join(group[:5])}{', ...' if len(group) > 5 else ''})")


def router_key(a: argparse.Namespace, names: list[str], cuts: CutSet) -> dict:
    return {"experts": {n: file_digest(a.saml_dir / "experts" / n / "adapter_model.safetensors") for n in names},
            "nf4": read_json(a.nf4_dir / "nf4.json")["fingerprint"], "utterances": ids_digest(c.id for c in cuts),
            **{k: getattr(a, k) for k in ("epochs", "lr", "batch_size", "max_duration", "window", "seed")},
            **({"hold_out_own_expert": True} if a.hold_out_own_expert else {}),
            **({"speed_perturb": a.speed_perturb} if a.speed_perturb else {})}


def held_out_batches(iterate: Callable[..., Iterator[dict]], cuts: CutSet, members: dict[str, list[str]],
                     names: list[str], epoch: int, seed: int) -> Iterator[tuple[dict, torch.Tensor]]:
    """Batches of one expert group's cuts each, the groups drawn at random in proportion to the utterances
    they have left, each with its mask over ``names``: the group's own expert held out (``iterate`` is the
    family's batch iterator with the other arguments bound)."""
    if len(names) < 2:
        raise BadInput("--hold-out-own-expert needs another expert than each group's own: give --sat-expert, or K >= 2")
    group_of = {s: name for name, speakers in members.items() for s in speakers}
    groups = {name: cuts.filter(lambda c, name=name: group_of[c.supervisions[0].speaker] == name).to_eager()
              for name in members if members[name]}
    left = {name: len(g) for name, g in groups.items()}
    batches = {name: iter(iterate(g, epoch=epoch, seed=seed)) for name, g in groups.items()}
    masks = {name: torch.tensor([n == name for n in names]) for name in groups}
    rng = random.Random(seed * 1000 + epoch)
    while batches:
        name = rng.choices(list(batches), weights=[left[n] for n in batches])[0]
        batch = next(batches[name], None)
        if batch is None:
            del batches[name]
            continue
        left[name] = max(1, left[name] - len(next(iter(batch.values()))))
        yield batch, masks[name]


def router(a: argparse.Namespace) -> None:
    """Step 3: train the router on the training cuts, the experts frozen."""
    torch.manual_seed(a.seed)
    cuts = CutSet.from_file(require(a.cuts, "stage 2 (manifests)")).to_eager()
    members = read_json(a.saml_dir / GROUPS, MADE_BY)["experts"]
    names = list(members)
    key = router_key(a, names, cuts)
    if (a.saml_dir / ROUTER_META).exists() and read_json(a.saml_dir / ROUTER_META).get("run_key") == key:
        logging.info(f"{a.saml_dir / ROUTER} was already trained from these experts and settings: nothing to do")
        return
    timer = StepTimer()
    rec = family(a.fp_dir).recognizer(a.fp_dir, a.device, 1, 0.5)
    # the targets the experts learned, in their style (with SAT's fp hypotheses where the style needs them)
    expert = read_json(a.saml_dir / "experts" / names[0] / META, MADE_BY)
    sat = Path(expert["init"])
    cuts = styled_targets(rec, cuts, expert["target_style"], a.fp_dir, a.saml_dir / ".router.fp_hyps.json",
                          also=fp_hypotheses_cache(sat, None))
    cuts = speed_perturbed(cuts, a.speed_perturb)
    rec.set_window(a.window)
    fingerprint = to_nf4(rec.model, a.nf4_dir, device=a.device)
    mixture = Mixture(rec.model, a.saml_dir, fingerprint, trainable_router=True)
    model, models = mixture.model, family(a.fp_dir)
    dim = encoder_means(rec, models, cuts.subset(first=1), "dim", model).shape[1]
    mixture.router = torch.nn.Linear(dim, len(names))
    torch.nn.init.zeros_(mixture.router.weight)  # every expert at 1/K to start
    torch.nn.init.zeros_(mixture.router.bias)
    optim = torch.optim.AdamW(mixture.router.parameters(), lr=a.lr, weight_decay=0.0)
    batch_iterator = models.batch_iterator(a.fp_dir, a.window)

    def batches_of(cuts: CutSet, epoch: int, seed: int) -> Iterator[dict]:
        return batch_iterator(cuts, a.batch_size, epoch=epoch, seed=seed, max_duration=a.max_duration)

    def epoch_batches(epoch: int) -> Iterator[tuple[dict, torch.Tensor | None]]:
        if a.hold_out_own_expert:
            return held_out_batches(batches_of, cuts, members, names, epoch, a.seed)
        return ((batch, None) for batch in batches_of(cuts, epoch, a.seed))

    timer.done("load the model and the experts")
    losses = []
    for epoch in range(a.epochs):
        model.train()
        freeze_batchnorm(model)
        total = count = 0
        for batch, held_out in tqdm(epoch_batches(epoch), desc=f"router epoch {epoch + 1}/{a.epochs}", unit="batch",
                                    mininterval=5):
            batch = {k: v.to(a.device) for k, v in batch.items()}
            with torch.no_grad(), model.disable_adapter():
                means = models.encoder_mean(base_net(model), batch)
            with RowAdapters(model, mixture.rows(mixture.weights(means, held_out))):
                loss = model(**batch)[0]
            optim.zero_grad()
            loss.backward()
            optim.step()
            total, count = total + loss.item(), count + 1
        losses.append(total / max(count, 1))
        logging.info(f"router epoch {epoch + 1}: mean loss {losses[-1]:.3f} over {count} batches")
    timer.done("train the router")
    with atomic_path(a.saml_dir / ROUTER) as tmp:
        save_file({k: v.detach().contiguous() for k, v in mixture.router.state_dict().items()}, str(tmp))
    size = Mixture.size(a.saml_dir)
    write_json(a.saml_dir / ROUTER_META, {
        "experts": names, "base_fingerprint": fingerprint, "input_dim": dim, "loss_per_epoch": losses,
        "router_params": sum(p.numel() for p in mixture.router.parameters()), "bytes": size,
        "run_key": key, **timer.report()})
    logging.info(f"wrote {a.saml_dir / ROUTER}: {len(names)} experts, {size:,} bytes with them")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("groups", "router"))
    p.add_argument("--fp-dir", type=Path, required=True, help="full-precision model (stage 4)")
    p.add_argument("--nf4-dir", type=Path, required=True, help="NF4 model (stage 5)")
    p.add_argument("--cuts", type=Path, required=True, help="the training cuts")
    p.add_argument("--saml-dir", type=Path, required=True, help="where the groups, experts and router are")
    p.add_argument("--experts", type=int, default=4, help="groups: at most this many experts")
    p.add_argument("--max-utts-per-speaker", type=int, default=20, help="groups: utterances a speaker for k-means")
    p.add_argument("--sat-expert", type=Path, help="groups: also this SAT adapter folder as the expert 'sat'")
    p.add_argument("--hold-out-own-expert", action="store_true",
                   help="router: route each training utterance without its own group's expert (as an unseen speaker)")
    p.add_argument("--epochs", type=int, default=1, help="router: training epochs")
    p.add_argument("--lr", type=float, default=3e-3, help="router: learning rate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-duration", type=float, default=0.0, help="batches of at most this many seconds (0: --batch-size)")
    p.add_argument("--window", default="padded", choices=("padded", "trimmed"), help="Whisper: the experts' input window")
    add_speed_perturb_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.experts < 1:
        p.error("--experts must be at least 1")
    check_speed_perturb(p, a.speed_perturb)
    setup_logging()
    (groups if a.step == "groups" else router)(a)


if __name__ == "__main__":
    cli(main)
