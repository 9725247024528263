"""The resbench command line: a thin Click layer that parses, builds a spec and calls one function."""
from __future__ import annotations

import click

import resnet

CONTEXT = dict(help_option_names=["-h", "--help"], show_default=True)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="resbench")
def main() -> None:
    """resbench: the degradation problem of He et al. 2015, on your hardware.

    \b
    Example:
      resbench models --depths 20,56
    """


def csv_ints(_ctx, _param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 20,32,44, got {value!r}") from None


@main.command()
@click.option("--depths", callback=csv_ints, default="20,32,44,56,110", help="CIFAR depths (6n+2).")
@click.option("--width", type=float, default=1.0, help="Channel multiplier.")
@click.option("--imagenet/--no-imagenet", default=True, help="Also list resnet18..152.")
def models(depths: list[int], width: float, imagenet: bool) -> None:
    """Print parameters and multiply-adds (32x32 input) of plain and residual twins.

    \b
    Example:
      resbench models --depths 20,32,44,56,110,1202
    """
    names = [f"{k}{d}" for d in depths for k in ("plain", "resnet")]
    if imagenet:
        names += [f"resnet{d}" for d in resnet.IMAGENET_DEPTHS]
    try:
        nets = {name: resnet.build(name, width=width) for name in names}
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    click.echo(f"{'model':<14}{'family':<10}{'params':>12}{'MACs':>14}")
    for name, net in nets.items():
        spec = resnet.parse(name)
        params, macs = resnet.count_params(net), resnet.count_macs(net)
        click.echo(f"{name:<14}{spec.family:<10}{params / 1e6:>11.3f}M{macs / 1e6:>13.1f}M")
