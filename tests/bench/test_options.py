"""The command line's options are declared once (bench.options): each Click option of sweep, run and profile is a
field of one of its typed groups, shown under that group's heading, and a key its --config file takes; the groups
parse what the options used to parse by hand."""
from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

from bench import cli, options
from bench.cli import main
from bench.options import Fuse, Methods, RecipeOverrides
from bench.specs import Recipe

COMMANDS = [(cli.sweep, options.SWEEP), (cli.run, options.RUN), (cli.profile, options.PROFILE)]


@pytest.mark.parametrize("command,groups", COMMANDS, ids=lambda c: getattr(c, "name", ""))
def test_each_option_is_one_field_of_one_group_and_a_config_key(command, groups):
    params = [p.name for p in command.params if isinstance(p, click.Option) and p.expose_value]
    names = [n for g in groups for n in g.names()]
    assert sorted(params) == sorted(set(names))  # every option a field, every field an option
    for name in set(names):  # a name in two groups is one option: the same declaration
        owners = [g for g in groups if name in g.names()]
        decls = {next(f.metadata["decls"] for f in fields(g) if f.name == name) for g in owners}
        assert len(decls) == 1, (name, owners)
    keys = options.config_keys(command)  # a --config file's keys: each option's names, nothing else
    assert set(keys.values()) == set(params) and all(keys[p] == p for p in params)
    shown = {n for heading, ns in command.sections.items() for n in ns}
    assert set(params) <= shown
    for g in groups:
        assert all(n in command.sections[g.heading] for n in g.names())


def test_a_config_file_takes_each_key_and_refuses_others(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('kinds = ["plain"]\ndepths = [8]\nfuse = "off"\nlr-for = {fixup = 0.1}\ntime = 30\n'
                    'slurm_opt = ["account=x"]\n')
    ctx = click.Context(cli.sweep, info_name="sweep")
    options.load_config(ctx, None, str(good))
    assert ctx.default_map["kinds"] == "plain" and ctx.default_map["time_min"] == 30  # --time's key: time
    bad = tmp_path / "bad.toml"
    bad.write_text("kinds = ['plain']\nconfig = 'other.toml'\nepochs = 3\n")
    res = CliRunner().invoke(main, ["sweep", "--config", str(bad)])
    assert res.exit_code == 2 and "unknown key(s) config, epochs" in res.output


def test_each_recipe_field_is_one_option_or_said_to_be_fixed():
    """A Recipe field is an option of the recipe group under the same name, or named as one no option sets;
    the sweep and run take them all."""
    names = RecipeOverrides.names()
    assert sorted(names + list(RecipeOverrides.FIXED)) == sorted(f.name for f in fields(Recipe))
    assert cli.sweep.sections["Recipe (overrides the preset's)"] == names == cli.run.sections[RecipeOverrides.heading]


def test_fuse_is_parsed_once_into_a_type():
    ctx = click.Context(cli.sweep)
    fuse = next(p for p in cli.sweep.params if p.name == "fuse")
    assert fuse.type_cast_value(ctx, "auto") == Fuse(None) and fuse.type_cast_value(ctx, "OFF") == Fuse(1)
    assert fuse.type_cast_value(ctx, "4") == Fuse(4) and str(Fuse(4)) == "4"
    res = CliRunner().invoke(main, ["sweep", "--fuse", "0"])
    assert res.exit_code == 2 and "must be auto, off or a group size >= 1, got '0'" in res.output


def test_the_preset_lr_grid_is_the_presets_grid_not_a_sentinel():
    from bench.specs import LR_GRIDS

    assert Methods(lr_grid="preset").grid("smoke") == LR_GRIDS["smoke"]
    assert Methods(lr_grid=(0.1, 0.2)).grid("smoke") == (0.1, 0.2) and Methods().grid("smoke") == ()
    with pytest.raises(click.BadParameter, match="has no lr grid"):
        Methods(lr_grid="preset").grid("he2015-imagenet")
