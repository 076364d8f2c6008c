"""The conformance kit over every built-in, and the kit against broken plugins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedmedbench.testing as kit
from fedmedbench import (
    Adversary,
    Aggregator,
    Algorithm,
    Attack,
    Compressor,
    Dataset,
    FederatedData,
    Model,
    Partitioner,
    PrivacyMechanism,
    Reporter,
    ServerStage,
    Split,
    UpdateStage,
)
from fedmedbench.registry import get_registry

BUILTINS = [i.cls for i in get_registry().all() if i.distribution == "fedmedbench"]


@kit.parametrize_with_checks(BUILTINS)
def test_builtin_conforms(component, check):
    check(component)


def test_every_family_has_builtins_checked():
    families = {c.family for c in BUILTINS}
    assert {"dataset", "partitioner", "model", "algorithm", "aggregator", "privacy",
            "compressor", "adversary", "attack", "reporter"} <= families


# -- deliberately broken components, one per check ----------------------------


class BadName(Algorithm):
    """Has an invalid name."""

    name = "Bad_Name"

    def __init__(self) -> None:
        pass


class Positional(Algorithm):
    """Takes a positional parameter."""

    name = "broken-positional"

    def __init__(self, mu=0.1) -> None:
        self.mu = mu


class Forgetful(Algorithm):
    """Does not store its parameter."""

    name = "broken-forgetful"

    def __init__(self, *, mu: float = 0.1) -> None:
        self._mu = mu


class Float64Data(Dataset):
    """Gives float64 features."""

    name = "broken-float64"

    def __init__(self) -> None:
        pass

    def load(self, *, seed):
        d = kit.KitTabular().load(seed=seed)
        s = d.sites[0]
        s.train = Split(s.train.X.astype(np.float64), s.train.y)
        return d


class Unseeded(Dataset):
    """Ignores the seed."""

    name = "broken-unseeded"

    def __init__(self) -> None:
        pass

    def load(self, *, seed):
        d = kit.KitTabular().load(seed=seed)
        noise = np.random.default_rng().normal(size=d.sites[0].train.X.shape)
        d.sites[0].train.X = (d.sites[0].train.X + noise).astype(np.float32)
        return d


class Duplicating(Partitioner):
    """Gives every client all the data."""

    name = "broken-duplicating"

    def __init__(self) -> None:
        pass

    def partition(self, data, *, seed):
        return FederatedData(data.task, [data.sites[0], data.sites[0]], data.public)


class WrongSize(Algorithm):
    """Sends an update of the wrong size."""

    name = "broken-wrong-size"

    def __init__(self) -> None:
        pass

    def client_update(self, ctx, global_params):
        return ctx.update(torch.zeros(3))


class FirstWins(Aggregator):
    """Returns the first update."""

    name = "broken-first-wins"
    linear = False

    def __init__(self) -> None:
        pass

    def aggregate(self, updates):
        return updates.delta[0]


class NoStages(PrivacyMechanism):
    """Inherits no stage interface."""

    name = "broken-no-stages"

    def __init__(self) -> None:
        pass


class Misspelt(PrivacyMechanism, UpdateStage):
    """Inherits the update stage but misspells its method."""

    name = "broken-misspelt"

    def __init__(self) -> None:
        pass

    def process_updates(self, ctx, updates):  # the stage's method is process_update
        return updates


class StagesDisagree(PrivacyMechanism, UpdateStage):
    """Declares the server stage, implements the update stage."""

    name = "broken-stages-disagree"
    stages = frozenset({"server"})

    def __init__(self) -> None:
        pass

    def process_update(self, ctx, updates):
        return updates


class EpsilonOnly(PrivacyMechanism, ServerStage):
    """Reports a bare dict instead of a typed Accounting (ε without δ)."""

    name = "broken-epsilon-only"
    dp_unit = "client"

    def __init__(self) -> None:
        pass

    def process_aggregate(self, ctx, aggregate, updates):
        return aggregate

    def accounting(self):
        return {"epsilon": 1.0}


class OneLogit(Model):
    """Outputs one logit whatever the number of classes."""

    name = "broken-one-logit"

    def __init__(self) -> None:
        pass

    def build(self, input_shape, num_classes):
        return torch.nn.Linear(int(np.prod(input_shape)), 1)


class ZeroBytes(Compressor):
    """Counts no bytes."""

    name = "broken-zero-bytes"

    def __init__(self) -> None:
        pass

    def compress(self, ctx, updates):
        return updates.replace(delta_bytes=[0] * len(updates))


class Dropper(Adversary):
    """Drops rows."""

    name = "broken-dropper"

    def corrupt_data(self, split, *, num_classes, rng):
        return split.subset(np.arange(len(split) // 2))


class SilentNA(Attack):
    """Says not applicable without a reason."""

    name = "broken-silent"

    def __init__(self) -> None:
        pass

    def evaluate(self, ctx):
        return {"not_applicable": ""}


class NoFiles(Reporter):
    """Claims a file it did not write."""

    name = "broken-no-files"

    def __init__(self) -> None:
        pass

    def write(self, records, out_dir):
        return [out_dir / "missing.md"]


class _Broken:
    __name__ = "broken-plugins"

    @kit.hookimpl
    def register_algorithms(self, register):
        for c in (BadName, Positional, Forgetful, WrongSize):
            register(c)

    @kit.hookimpl
    def register_datasets(self, register):
        register(Float64Data)
        register(Unseeded)

    @kit.hookimpl
    def register_partitioners(self, register):
        register(Duplicating)

    @kit.hookimpl
    def register_aggregators(self, register):
        register(FirstWins)

    @kit.hookimpl
    def register_privacy(self, register):
        for c in (NoStages, Misspelt, StagesDisagree, EpsilonOnly):
            register(c)

    @kit.hookimpl
    def register_models(self, register):
        register(OneLogit)

    @kit.hookimpl
    def register_compressors(self, register):
        register(ZeroBytes)

    @kit.hookimpl
    def register_adversaries(self, register):
        register(Dropper)

    @kit.hookimpl
    def register_attacks(self, register):
        register(SilentNA)

    @kit.hookimpl
    def register_reporters(self, register):
        register(NoFiles)


BROKEN = _Broken()


@pytest.mark.parametrize("cls, check, message", [
    (BadName, kit.check_name, "name 'Bad_Name' is not lower-case-with-dashes"),
    (Positional, kit.check_keyword_only_params,
     "parameter 'mu' is positional. Fix: make it keyword-only"),
    (Forgetful, kit.check_config_roundtrip, "params() failed"),
    (Float64Data, kit.check_dataset_loads, "has dtypes float64/int64. Fix: use float32"),
    (Unseeded, kit.check_dataset_deterministic, "differs between two loads with seed=3"),
    (Duplicating, kit.check_partitioner, "training rows were lost, duplicated or invented"),
    (WrongSize, kit.check_algorithm_runs, "the kit cell ended failed"),
    (FirstWins, kit.check_aggregator, "depends on the order of clients"),
    (NoStages, kit.check_privacy, "the class inherits no stage interface"),
    (Misspelt, kit.check_privacy, "does not implement update: process_update"),
    (StagesDisagree, kit.check_privacy, "declares stages ['server'] but implements ['update']"),
    (EpsilonOnly, kit.check_privacy, "not fedmedbench.Accounting"),
    (OneLogit, kit.check_model, "output shape (2, 1)"),
    (ZeroBytes, kit.check_compressor, "no bytes were counted"),
    (Dropper, kit.check_adversary, "changed the split's size"),
    (SilentNA, kit.check_attack, "not_applicable has no reason"),
    (NoFiles, kit.check_reporter, "write returned"),
])
def test_kit_catches_broken_plugin(cls, check, message):
    reg = kit.kit_registry(extra=[BROKEN])
    with pytest.raises(kit.CheckFailure) as e:
        check(cls, reg)
    text = str(e.value)
    assert message in text
    assert f"{cls.family} {cls.name!r} (plugin broken-plugins)" in text
    assert "Fix:" in text
