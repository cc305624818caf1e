"""push-to-hub: release the final adapter, the merged model and its GGUF files as Hub repos, with model cards.

    python stages/push_to_hub.py --params params.yaml --base models/base --adapter models/dpo \
        --merged models/merged --gguf models/gguf --metrics metrics --out models/hub --receipt metrics/push.json

    HF_TOKEN=hf_... HF_HUB_OFFLINE=0 dvc exp run push-to-hub -S hub.push=true   # really upload

Reads `hub` (repos, privacy, card metadata), `domain` (the cards' subject, example question, warning, tags
and licence; `auto` = the base model's), `generate` (the merged model's generation config) and the
training params the cards describe. Always stages exactly what would be uploaded into models/hub/adapter,
models/hub/merged (hard links to the weights, fresh adapter_config.json / generation_config.json /
README.md) and, with `hub.gguf_repo` set and GGUF files from the export stage, models/hub/gguf (the files
metrics/export.json verified, the Modelfile, a card with their sizes and agreement). Writes
metrics/push.json: per repo the files with size and sha256, and what was uploaded.
Refuses, in one line, to publish a model that metrics/evaluate.json calls worse than its base (more harmful
requests affirmed or more key facts contradicted) unless `hub.allow_worse_than_base: true`; a dry run stages
it with cards that open with that warning and a receipt that says a push would be refused. Uploads only with `hub.push: true` and a token; then only files whose sha256 differs from the Hub's copy,
and no commit at all when nothing changed. The token is handed to huggingface_hub and never written.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from qatune import hub
from qatune.cards import CardInputs, render_card
from qatune.errors import fail_cleanly
from qatune.io import json_text
from qatune.params import Params, load_params
from qatune.provenance import PROVENANCE_FILE, git_commit


def card_provenance(base_dir: str, adapter_dir: str, lock: str) -> dict:
    """Data hash and code version as recorded by the dpo stage, plus this release's commit and dvc.lock."""
    trained = hub.read_json(Path(adapter_dir) / PROVENANCE_FILE) or {}
    return {
        "base_revision": hub.base_revision(base_dir),
        "data_sha256": trained.get("data_sha256"),
        "trained_commit": trained.get("git_commit"),
        "release_commit": git_commit(),
        "dvc_lock": hub.lock_entries(lock, ("dpo", "merge", "export")),
    }


def public_provenance(params: Params, base_id: str, prov: dict, metrics: dict) -> dict:
    """qatune_provenance.json as published: resolved params and hashes, no local paths."""
    dumped = params.model_dump(include={"seed", "beta", "train", "sft", "dpo", "merge", "export", "generate"})
    source = params.base_model.source
    return {
        "base_model": {
            "hub_id": base_id,
            "revision": prov["base_revision"],
            "source": source
            if source.startswith("bundled:") or hub.looks_like_hub_id(source)
            else "local folder",
        },
        "params": dumped,
        "data_sha256": prov["data_sha256"],
        "trained_commit": prov["trained_commit"],
        "release_commit": prov["release_commit"],
        "dvc_lock": prov["dvc_lock"],
        "metrics": metrics,
    }


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read")
    parser.add_argument("--base", default="models/base", help="base model folder from fetch (for its Hub id)")
    parser.add_argument("--adapter", default="models/dpo", help="final LoRA adapter to release")
    parser.add_argument("--merged", default="models/merged", help="merged model to release")
    parser.add_argument("--gguf", default="models/gguf", help="the export stage's GGUF files and Modelfile")
    parser.add_argument("--metrics", default="metrics", help="folder with sft/dpo/merge/evaluate/export.json")
    parser.add_argument("--out", default="models/hub", help="staging folder: exactly what is uploaded")
    parser.add_argument("--receipt", default="metrics/push.json", help="what was staged and uploaded")
    parser.add_argument(
        "--lock", default="dvc.lock", help="dvc.lock to quote in the cards (skipped if absent)"
    )
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = params.hub
    token, note = hub.upload_plan(cfg.push)  # fails early on push + offline, before any work

    base_id = hub.resolve_base_id(cfg.base_model_id, args.base, params.base_model.source)
    # domain.license auto follows the base's licence; an unknown one stops the release here, before any work
    base_license = hub.card_license(Path(args.base) / "README.md")
    hub.release_license(params.domain.license, base_id, base_license)
    metrics_dir = Path(args.metrics)
    metrics = {
        name: hub.read_json(metrics_dir / f"{name}.json")
        for name in ("sft", "dpo", "merge", "evaluate", "export")
    }
    # harm first: a model the evaluate stage found worse than its base is not released without an override
    worse = hub.release_verdict(metrics["evaluate"], cfg.allow_worse_than_base, token is not None)
    if worse and token is not None:
        print(
            f"push-to-hub: warning: releasing a model worse than its base ({worse}): hub.allow_worse_than_base"
        )
    elif worse:
        note = (note + "; " if note else "") + (
            f"the evaluate stage found this model worse than its base ({worse}): a push would be refused"
            + ("" if cfg.allow_worse_than_base else " unless hub.allow_worse_than_base: true")
        )
    prov = card_provenance(args.base, args.adapter, args.lock)
    published = json_text(public_provenance(params, base_id, prov, metrics))
    repos = {"adapter": cfg.adapter_repo, "merged": cfg.merged_repo}
    sources = {"adapter": Path(args.adapter), "merged": Path(args.merged)}
    files = {role: hub.publishable_files(sources[role]) for role in repos}
    skipped_gguf = None
    if cfg.gguf_repo:
        files["gguf"], skipped_gguf = hub.gguf_release_files(args.gguf, metrics["export"])
        if files["gguf"]:
            repos["gguf"] = cfg.gguf_repo

    merged_gen = hub.read_json(sources["merged"] / "generation_config.json") or {}
    generated = {
        "adapter": {
            "adapter_config.json": json_text(
                hub.adapter_config(sources["adapter"] / "adapter_config.json", base_id, prov["base_revision"])
            )
        },
        "merged": {"generation_config.json": json_text(hub.generation_config(merged_gen, params.generate))},
        "gguf": {},
    }
    siblings = {"adapter": cfg.merged_repo, "merged": cfg.adapter_repo, "gguf": cfg.merged_repo}
    needles = hub.local_path_needles(
        args.base, args.adapter, args.merged, args.gguf, params.base_model.source
    )
    entries = []
    for role in (r for r in hub.ROLES if r in repos):
        card = render_card(
            CardInputs(
                role=role,
                repo_id=repos[role],
                sibling_repo=siblings[role],
                base_id=base_id,
                params=params,
                sft=metrics["sft"],
                dpo=metrics["dpo"],
                merge=metrics["merge"],
                evaluation=metrics["evaluate"],
                export=metrics["export"],
                provenance=prov,
                worse_than_base=worse,
                base_license=base_license,
            )
        )
        written = {**generated[role], "README.md": card, PROVENANCE_FILE: published}
        staged = Path(args.out) / role
        counts = hub.stage_folder(files[role], staged, written)
        hub.check_no_local_paths(staged, needles)
        entries.append(hub.repo_receipt(role, repos[role], cfg.private, staged, hub.manifest(staged)))
        print(
            f"push-to-hub: staged {role} -> {staged} ({counts['link']} linked, {counts['copy']} copied, "
            f"{counts['generated']} generated)"
        )

    if "gguf" not in repos:  # no GGUF release this time: an earlier one's staging must not linger
        shutil.rmtree(Path(args.out) / "gguf", ignore_errors=True)
    if skipped_gguf:
        print(f"push-to-hub: no GGUF release ({cfg.gguf_repo}): {skipped_gguf}")
    if token is not None:
        message = f"qatune release ({(prov['release_commit'] or 'no git commit')[:12]})"
        entries = [hub.push_repo(token, entry, message) for entry in entries]
        for entry in entries:
            what = f"uploaded {len(entry['uploaded'])}" if entry["uploaded"] else "nothing to upload"
            if entry["deleted"]:
                what += f", deleted {len(entry['deleted'])} no longer in the release ({', '.join(entry['deleted'])})"
            print(
                f"push-to-hub: {entry['repo_id']}: {what}, {len(entry['unchanged'])} unchanged -> {entry['url']}"
            )
            if entry["private"] != cfg.private:
                print(
                    f"push-to-hub: note: {entry['repo_id']} already exists as "
                    f"{'private' if entry['private'] else 'public'}; qatune does not change an existing repo's visibility"
                )
    hub.write_receipt(args.receipt, "uploaded" if token else "dry-run", note, entries)
    if note:
        print(f"push-to-hub: note: {note}")
    if token is None:
        total = sum(e["total_bytes"] for e in entries)
        print(f"push-to-hub: dry run, {total / 1e6:.1f} MB staged in {args.out}; receipt {args.receipt}")


if __name__ == "__main__":
    main()
