"""regdrop_ext.convert on real models, built from their configs (no download):
the random ops left native in a training forward, and CPU training steps.

For each model, one training-mode forward is traced three times:
  original       torch's dropout everywhere
  layers         after convert(model): the dropout layers swapped
  + functional   after convert(model, functional=True, attention="math"):
                 functional dropout and SDPA's dropout_p too (on the CPU,
                 SDPA runs its math path once dropout_p > 0 anyway)
and it checks that the converted model's eval output is bit-identical to the
original's. Then it times training steps (forward, backward, SGD step) of
the three, interleaved, in one run, and prints their medians and two ratios
(>1: the second is faster): layers / + functional, the opt-in's own effect,
and original / + functional. Models whose package does not import here are
skipped, with why.

    python examples/real_models.py [--quick] [--steps N] [--only NAME ...]

--quick builds small configs of the same classes (the test suite's mode).
"""

import argparse
import copy
import importlib
import statistics
import time

import torch
from torch import nn

import regdrop_ext


def vision_loss(model, batch):
    images, labels = batch
    return nn.functional.cross_entropy(model(images), labels)


def hf_loss(model, batch):
    return model(**batch).loss


def images(size: int, batch: int = 2, classes: int = 10):
    return torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))


def timm_model(name: str, quick: dict, **full):
    def build(is_quick: bool):
        timm = importlib.import_module("timm")
        options = quick if is_quick else full
        model = timm.create_model(name, num_classes=10, drop_rate=0.1, drop_path_rate=0.1, **options)
        return model, images(32 if is_quick else 224), vision_loss

    return "timm", build


def torchvision_model(make):
    def build(is_quick: bool):
        models = importlib.import_module("torchvision.models")
        model, size = make(models, is_quick)
        return model, images(size), vision_loss

    return "torchvision", build


def hf_model(config_name: str, model_name: str, full: dict, quick: dict, kind: str):
    def build(is_quick: bool):
        transformers = importlib.import_module("transformers")
        config = getattr(transformers, config_name)(**(quick if is_quick else full))
        model = getattr(transformers, model_name)(config)
        batch, tokens = (4, 16) if is_quick else (4, 64)
        ids = torch.randint(0, config.vocab_size, (batch, tokens))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if kind == "classifier":
            inputs["labels"] = torch.randint(0, config.num_labels, (batch,))
        else:
            inputs["labels"] = torch.randint(0, config.vocab_size, (batch, tokens))
        return model, inputs, hf_loss

    return "transformers", build


MODELS = {
    "timm ViT-S/16": timm_model(
        "vit_small_patch16_224",
        dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, attn_drop_rate=0.1, proj_drop_rate=0.1),
        attn_drop_rate=0.1, proj_drop_rate=0.1,
    ),
    "timm ConvNeXt-T": timm_model("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))),
    "timm EfficientNet-B0": timm_model("efficientnet_b0", {}),
    "timm ResNet-18": timm_model("resnet18", {}),
    "torchvision ViT-B/16": torchvision_model(
        lambda models, quick: (
            models.VisionTransformer(32, 16, 2, 2, 32, 64, dropout=0.1, attention_dropout=0.1, num_classes=10), 32
        ) if quick else (models.vit_b_16(dropout=0.1, attention_dropout=0.1, num_classes=10), 224)
    ),
    "torchvision EfficientNet-B0": torchvision_model(
        lambda models, quick: (models.efficientnet_b0(num_classes=10, stochastic_depth_prob=0.2), 32 if quick else 224)
    ),
    "torchvision ConvNeXt-T": torchvision_model(
        lambda models, quick: (models.convnext_tiny(num_classes=10, stochastic_depth_prob=0.1), 32 if quick else 224)
    ),
    "torchvision Swin-T": torchvision_model(
        lambda models, quick: (
            models.SwinTransformer([4, 4], 16, [1, 1], [2, 2], [2, 2], dropout=0.1, attention_dropout=0.1,
                                   stochastic_depth_prob=0.1, num_classes=10), 32,
        ) if quick else (models.swin_t(num_classes=10, dropout=0.1, attention_dropout=0.1), 224)
    ),
    "HF BERT-base": hf_model(
        "BertConfig", "BertForSequenceClassification", dict(num_labels=3),
        dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3),
        "classifier",
    ),
    "HF BERT-base, eager attention": hf_model(
        "BertConfig", "BertForSequenceClassification", dict(num_labels=3, attn_implementation="eager"),
        dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             num_labels=3, attn_implementation="eager"),
        "classifier",
    ),
    "HF GPT-2": hf_model(
        "GPT2Config", "GPT2LMHeadModel", dict(), dict(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64), "lm"
    ),
    "HF T5-small": hf_model(
        "T5Config", "T5ForConditionalGeneration", dict(decoder_start_token_id=0),
        dict(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0),
        "lm",
    ),
}  # fmt: skip


def call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch[0])


def native_ops(model, batch) -> tuple[int, int]:
    """(native, all) random ops of one training-mode forward."""
    trace = regdrop_ext.trace_random_ops(model.train(), **batch) if isinstance(batch, dict) else (
        regdrop_ext.trace_random_ops(model.train(), batch[0])
    )
    return sum(c.count for c in trace.native), sum(c.count for c in trace.calls)


def eval_output(model, batch):
    with torch.no_grad():
        out = call(model.eval(), batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def step_times(models: dict, batch, loss_fn, steps: int) -> dict:
    """Interleaved training steps of every model (one warm-up each): median seconds per step."""
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3) for name, model in models.items()}
    times = {name: [] for name in models}
    for step in range(steps + 1):
        for name, model in models.items():
            model.train()
            start = time.perf_counter()
            optimizers[name].zero_grad()
            loss_fn(model, batch).backward()
            optimizers[name].step()
            if step:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small configs, 2 timed steps")
    parser.add_argument("--steps", type=int, help="timed steps per model, 0 for none (default: 2 quick, 3 otherwise)")
    parser.add_argument("--only", nargs="*", help="models whose name contains one of these")
    args = parser.parse_args()
    steps = args.steps if args.steps is not None else 2 if args.quick else 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, regdrop_ext {regdrop_ext.__version__}")
    print("model | native random ops of a training forward: original, layers converted, + functional | "
          "eval identical | step ms: original, layers, + functional | ratios layers / + functional, "
          "original / + functional (>1: + functional faster)")
    for name, (package, build) in MODELS.items():
        if args.only and not any(part in name for part in args.only):
            continue
        try:
            importlib.import_module(package)
        except Exception as error:  # a CUDA torchvision beside a CPU torch raises RuntimeError
            print(f"{name} | skipped: {package} is not usable here ({type(error).__name__}: {error})")
            continue
        torch.manual_seed(0)
        original, batch, loss_fn = build(args.quick)
        layers, _ = regdrop_ext.convert(original, inplace=False)
        functional, summary = regdrop_ext.convert(original, inplace=False, functional=True, attention="math")
        counts = [native_ops(model, batch) for model in (original, layers, functional)]
        identical = torch.equal(eval_output(original, batch), eval_output(functional, batch))
        row = f"{name} | {counts[0][0]}/{counts[0][1]}, {counts[1][0]}, {counts[2][0]} | {identical}"
        if steps:
            times = step_times({"original": original, "layers": layers, "functional": functional}, batch, loss_fn, steps)
            row += " | " + ", ".join(f"{1e3 * times[name]:.1f}" for name in ("original", "layers", "functional"))
            row += f" | {times['layers'] / times['functional']:.2f}x, {times['original'] / times['functional']:.2f}x"
        print(row, flush=True)


if __name__ == "__main__":
    main()
