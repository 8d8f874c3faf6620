"""A real model's training step with and without fuse_norms, on the CPU.

Both copies are converted (regdrop_ext.convert: fused dropout layers); one is
also given regdrop_ext.fuse_norms (dropout + residual + LayerNorm in one op).
They share weights and data, and their steps alternate, so that load on the
machine falls on both alike; the median step times and their ratio are
printed.

    python benchmarks/norm_models.py bert        # BERT-base-sized (transformers; built from a config)
    python benchmarks/norm_models.py vit         # ViT-S/16 (timm; needs torchvision)

No weights are downloaded: the models are built from their configurations.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.pop(0)
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import regdrop_ext  # noqa: E402
from benchmarks import environment  # noqa: E402


def bert_base():
    """BERT-base's shape (hidden 768, 12 layers of 12 heads, MLP 3072), a batch of 8 x 128 tokens."""
    import transformers

    config = transformers.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, hidden_dropout_prob=0.1,
                                     attention_probs_dropout_prob=0.1)
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(0, config.vocab_size, (8, 128))
    labels = torch.randint(0, 2, (8,))
    return model, lambda m: m(input_ids=ids, labels=labels).loss


def vit_small():
    """timm's ViT-S/16 (224 x 224, 384 wide, 12 blocks of 6 heads), stochastic depth 0.1, a batch of 8."""
    import timm

    model = timm.models.vision_transformer.VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12,
                                                             num_heads=6, num_classes=1000, drop_rate=0.1,
                                                             drop_path_rate=0.1)
    images = torch.randn(8, 3, 224, 224)
    labels = torch.randint(0, 1000, (8,))
    return model, lambda m: nn.functional.cross_entropy(m(images), labels)


MODELS = {"bert": bert_base, "vit": vit_small}


def step_time(model, loss_fn, optimizer) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    optimizer.step()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each (after 2 warm-up steps)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    env = environment.describe(torch.device("cpu"), torch.get_num_threads())
    print(environment.header(env))

    base, loss_fn = MODELS[args.model]()
    plain, _ = regdrop_ext.convert(copy.deepcopy(base))
    fused, _ = regdrop_ext.convert(copy.deepcopy(base))
    summary = regdrop_ext.fuse_norms(fused)
    print(summary)
    runs = {}
    for name, model in (("convert", plain), ("convert + fuse_norms", fused)):
        model.train()
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-3), [])
    for step in range(args.steps + 2):
        for name, (model, optimizer, times) in runs.items():
            elapsed = step_time(model, loss_fn, optimizer)
            if step >= 2:
                times.append(elapsed)
    medians = {name: statistics.median(times) * 1e3 for name, (_, _, times) in runs.items()}
    for name, ms in medians.items():
        print(f"{name:<22} median step {ms:8.1f} ms over {args.steps} steps")
    print(f"fuse_norms speed-up: {medians['convert'] / medians['convert + fuse_norms']:.3f}x (of the medians)")
    # Steps are paired as they ran, back to back, so that a pair shares the
    # machine's state: the median pair's ratio, and how many pairs the fused
    # model won (a sign test's count: about half when the two are alike).
    pairs = [p / f for p, f in zip(runs["convert"][2], runs["convert + fuse_norms"][2])]
    won = sum(r > 1 for r in pairs)
    print(f"paired steps: median speed-up {statistics.median(pairs):.3f}x, fused faster in {won} of {len(pairs)}")
    return 0


if __name__ == "__main__":
    environment.pin_allocator()
    sys.exit(main())
