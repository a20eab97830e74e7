"""HSTU, SASRec and HLLM on MovieLens-100k under one loss and budget, over several seeds: HR@10
and NDCG@10 with standard errors.

The protocol of bench/retrieval_quality.py for sequential models (leave-last-out, one training row
per user with the last 200 movies, every next movie learned, full ranking of the 1,682 movies,
embedding dim 16, dense Adam 0.001, row-wise Adagrad 0.05, batch 16 users per rank, 2 gloo ranks),
with what differed between the models' own configs made the same:

* loss: sampled softmax over the same 128 uniform negatives per batch (``--sampled-negatives
  128``), at temperature 0.05 over L2-normalized user and item vectors (HSTU's reference setting;
  SASRec's config scores raw dot products at temperature 1);
* features: the movie id, the history and (read by HSTU only) the timestamps;
* budget: the same epochs and steps.

HLLM runs on ``transformers`` models (``model.item_llm`` / ``user_llm``): Llama-architecture item
and user models of 2 layers, width 64, 2 heads, built from inline configs with random weights (no
pretrained checkpoint can be fetched on this machine), the item model trained with the rest
(``train_item_llm``) on each movie's ``title`` and ``genre_names`` through a word-level tokenizer
built here from the catalogue's words, plus the id embeddings. It is HLLM's architecture, not its
pretrained starting point.

Each (model, seed) sets ``train.seed`` (initialization, shuffling and the negatives). Usage:

    python bench/generative_comparison.py [--models sasrec,hstu,hllm] [--seeds 3] [--epochs 30] [--work /tmp/shardrec-gen]
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from model_quality import CONFIGS, parse_args, save_job, train_job  # bench/ is on sys.path when a bench runs
from retrieval_quality import USER_BATCH, features, prepare

MODELS = ["sasrec", "hstu", "hllm"]
LOSS = {"kind": "sampled", "temperature": 0.05}
WIDTH = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 256}


def tokenizer_folder(items: Path, out: Path) -> Path:
    """A word-level tokenizer over the words of the catalogue's title and genre_names, saved to ``out``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").is_file():
        return out
    table = pq.read_table(items, columns=["title", "genre_names"])
    pre = pre_tokenizers.Whitespace()
    texts = [f"title: {t}. genre_names: {g}" for t, g in zip(table["title"].to_pylist(), table["genre_names"].to_pylist())]
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(out)
    return out


def model_section(name: str, *, schema: Path, work: Path) -> dict[str, Any]:
    """Model ``name``'s section: its config file's, under the shared loss (HLLM: language models)."""
    if name != "hllm":
        model = dict(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"])
        return model | {"loss": LOSS, "normalize": True}
    items = Path(yaml.safe_load(schema.read_text())["data"]["items_path"])
    tok = tokenizer_folder(items, work / "tokenizer")
    vocab = len(yaml.safe_load((tok / "tokenizer.json").read_text())["model"]["vocab"])
    return {
        "name": "hllm", "item_feature": "movie_id", "history_feature": "hist_movie_ids",
        "item_llm": {"model_type": "llama", "vocab_size": vocab, "pad_token_id": 0, **WIDTH},
        "user_llm": {"model_type": "llama", "vocab_size": 8, **WIDTH},
        "tokenizer": str(tok), "train_item_llm": True, "id_embeddings": True, "vector_dim": 16, "dropout": 0.2,
        "item_text": {"path": str(items), "columns": ["title", "genre_names"], "max_tokens": 16},
        "cache_dir": str(work / "cache"), "loss": LOSS, "normalize": True,
    }


def write_job(name: str, *, schema: Path, work: Path, epochs: int, seed: int) -> Path:
    model = model_section(name, schema=schema, work=work)
    job = {
        "include": [str(schema)],
        # Every model reads SASRec's features (HSTU's timestamps are among them).
        "features": features("sasrec", schema, model),
        "model": model,
        "data": {"batch_size": USER_BATCH},
        "train": {
            "steps": None, "epochs": epochs, "progress_bar": False, "seed": seed,
            "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05},
            "dense_optimizer": {"name": "adam", "lr": 0.001},
            "retrieval": {"ks": [10, 50], "export_items": False},
        },
        "checkpoint": {"enabled": False},
        "run": {"root": str(work / "runs")},
    }
    return save_job(f"{name}_seed{seed}", job, work=work)


def mean_se(values: list[float]) -> str:
    """``mean ± standard error`` over seeds."""
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.4f} ± {se:.4f}"


def main() -> None:
    args, names = parse_args(__doc__, models=MODELS, epochs=30, work="/tmp/shardrec-gen",
                             extend=lambda p: p.add_argument("--seeds", type=int, default=3))
    schema = prepare(args.input, args.work / "movielens_user", sequential=True)
    results: dict[str, list[dict[str, Any]]] = {}
    print("| model | seed | HR@10 | NDCG@10 | Recall@50 | train rows/s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for seed in range(args.seeds):  # seeds outermost: a stopped run still has every model's first seeds
        for name in names:
            job = write_job(name, schema=schema, work=args.work, epochs=args.epochs, seed=seed)
            r = train_job(job, run_dir=args.work / "runs" / job.stem)
            results.setdefault(name, []).append(r)
            print(f"| {name} | {seed} | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | {r['recall@50']:.4f} | "
                  f"{r['samples_per_s']:,.1f} | {r['wall_s']:.0f} |", flush=True)
    print(f"\n| model | HR@10 (mean ± s.e., {args.seeds} seeds) | NDCG@10 | embedding params | dense params |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        print(f"| {name} | {mean_se([r['hr@10'] for r in rs])} | {mean_se([r['ndcg@10'] for r in rs])} | "
              f"{rs[0]['embedding']:,} | {rs[0]['dense']:,} |")
    if "hstu" in results and "sasrec" in results:
        for metric in ("hr@10", "ndcg@10"):
            diff = [h[metric] - s[metric] for h, s in zip(results["hstu"], results["sasrec"])]
            print(f"\nHSTU - SASRec {metric}, paired by seed: {mean_se(diff)} (each seed: "
                  f"{', '.join(f'{d:+.4f}' for d in diff)})")
    print(f"\ntest users: {rs[0]['rows']:,}, items ranked: {rs[0]['items']:,}; jobs: {args.work / 'jobs'}")


if __name__ == "__main__":
    main()
