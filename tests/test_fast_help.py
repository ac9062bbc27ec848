"""``--help`` lists Hydra's config groups from one copy of the config repository (issue #26, answers in a
second): the same listing as Hydra's own, and nothing patched outside the help screen."""

from __future__ import annotations

from hydra import initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType

from lightning_clipprune.app.cli import fast_help
from lightning_clipprune.run import config_dir


def _all_groups(loader: ConfigLoaderImpl) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}

    def walk(parent: str) -> None:
        for group in loader.get_group_options(parent, ObjectType.GROUP):
            name = f"{parent}/{group}" if parent else group
            out[name] = loader.get_group_options(name, ObjectType.CONFIG)
            walk(name)

    walk("")
    return out


def test_the_help_listing_is_hydras_less_the_building_blocks_and_only_while_help_is_asked() -> None:
    original = ConfigLoaderImpl.get_group_options
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        plain = _all_groups(loader)
        with fast_help(["+experiment=cifar", "--help"]):
            assert ConfigLoaderImpl.get_group_options is not original
            fast = _all_groups(loader)
            assert loader.get_group_options("experiment") == plain["experiment"]  # the default filter: configs
        assert ConfigLoaderImpl.get_group_options is original
        with fast_help(["+experiment=cifar", "prune.sparsity=0.9"]):
            assert ConfigLoaderImpl.get_group_options is original
    # Hydra's listing, less the presets' building blocks (`clip/_base.yaml`), which are not choices
    assert "_base" in plain["clip"] and "_base" not in fast["clip"]
    assert fast == {g: [o for o in opts if not o.startswith("_")] for g, opts in plain.items()}
    assert "experiment" in plain and "cifar" in plain["experiment"] and len(plain) >= 10
