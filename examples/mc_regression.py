"""Monte Carlo dropout uncertainty on a toy 1-D regression.

A small MLP with dropout learns y = sin(3x) + noise from points in [-1, 1];
regdrop_ext.mc_predict then runs it with dropout on, many times, over
[-3, 3]. The spread of the predictions grows away from the data. Prints the
mean and std at a few points and, where matplotlib is installed, plots them.

    python examples/mc_regression.py [--quick] [--out PLOT.png]

Without --out, the plot goes to a new temporary directory (the path is printed),
never into the working directory.
"""

import argparse
import os
import tempfile

import torch
from torch import nn

import regdrop_ext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer training steps and samples")
    parser.add_argument("--out", help="where to write the plot (default: mc_regression.png in a new temporary directory)")
    args = parser.parse_args()
    # A few hundred steps fit the data (MSE near the noise variance, 0.01);
    # much longer training of this ReLU net narrows the band far from the data.
    steps, samples = (150, 100) if args.quick else (500, 1000)

    torch.manual_seed(0)
    x = torch.rand(200, 1) * 2 - 1
    y = torch.sin(3 * x) + 0.1 * torch.randn_like(x)
    model = nn.Sequential(
        nn.Linear(1, 128), nn.ReLU(), regdrop_ext.Dropout(0.1),
        nn.Linear(128, 128), nn.ReLU(), regdrop_ext.Dropout(0.1),
        nn.Linear(128, 1),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    grid = torch.linspace(-3, 3, 241).unsqueeze(1)
    prediction = regdrop_ext.mc_predict(model.eval(), grid, samples, generator=torch.Generator().manual_seed(0))
    print(f"{samples} MC dropout samples; training data in [-1, 1]")
    print("     x    mean     std")
    for point in (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0):
        i = int(torch.argmin((grid - point).abs()))
        print(f"{point:6.1f} {prediction.mean[i, 0].item():7.3f} {prediction.std[i, 0].item():7.3f}")

    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = prediction.mean[:, 0], prediction.std[:, 0]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.axvspan(-1, 1, color="0.93", label="training range")
    axes.fill_between(grid[:, 0], mean - 2 * std, mean + 2 * std, alpha=0.3, label="mean ± 2 std")
    axes.plot(grid[:, 0], mean, label="MC mean")
    axes.scatter(x[:, 0], y[:, 0], s=6, color="black", label="data")
    axes.set(xlabel="x", ylabel="y", title="MC dropout: uncertainty grows away from the data")
    axes.legend(loc="lower left")
    figure.tight_layout()
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="regdrop_ext_example_"), "mc_regression.png")
    figure.savefig(out, dpi=120)
    print(f"plot written to {out}")


if __name__ == "__main__":
    main()
