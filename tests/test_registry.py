"""The registry is the one place pass names are resolved: the Python API, config files and plans all
raise its message for an unknown name."""

from __future__ import annotations

import onnx
import pytest

from passes.fuse_1x1_chain import Fuse1x1Chain
from rewriter.config import build_passes
from rewriter.errors import InputError
from rewriter.plan import Plan, PlanStep, apply_plan
from rewriter.registry import available_passes, pass_class, resolve_pass, resolve_passes


def test_unknown_pass_has_one_message_everywhere(sample_model: onnx.ModelProto) -> None:
    with pytest.raises(InputError) as direct:
        pass_class("nope")
    message = str(direct.value)
    assert message == f"unknown pass 'nope'; known passes: {', '.join(sorted(available_passes()))}"
    for call in (lambda: resolve_passes("fuse_1x1_chain,nope"), lambda: resolve_passes(["nope"]), lambda: build_passes("nope")):
        with pytest.raises(InputError) as info:
            call()
        assert str(info.value) == message
    with pytest.raises(InputError) as info:
        build_passes(None, {"nope": {}})
    assert str(info.value) == f"[pass-options.nope]: {message}"
    with pytest.raises(InputError) as info:
        apply_plan(sample_model, Plan((PlanStep("nope", ("a",)),), None))
    assert str(info.value) == f"plan step 1 (nope on a): {message}"


def test_resolve_builds_each_pass_with_its_options() -> None:
    (p,) = resolve_passes("fuse_1x1_chain", {"fuse_1x1_chain": {}})
    assert isinstance(p, Fuse1x1Chain)
    assert isinstance(resolve_pass("fuse_1x1_chain"), Fuse1x1Chain)
    with pytest.raises(InputError, match="pass 'fuse_1x1_chain' has no option 'nope'"):
        resolve_passes("fuse_1x1_chain", {"fuse_1x1_chain": {"nope": 1}})
    with pytest.raises(InputError, match="no passes selected"):
        resolve_passes(" , ")
    assert all(p.exact for p in resolve_passes(None))
