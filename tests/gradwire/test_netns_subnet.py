"""Two shaped simulations on one machine take different subnets (gradwire/netns.py): two bridges
holding the same address would route each other's packets astray."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

from gradwire import netns

TAKEN = ("480: gw1br    inet 169.254.90.1/24 scope global gw1br\\n"
         "481: eth0    inet 10.0.0.5/24 scope global eth0\\n")


@pytest.fixture
def host(monkeypatch):
    shown = {"text": TAKEN}
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=shown["text"], returncode=0))
    monkeypatch.delenv("GRADWIRE_SIM_SUBNET", raising=False)
    return shown


def test_the_first_free_subnet_is_taken(host):
    assert netns.free_subnet_prefix() == "169.254.91"
    host["text"] = ""
    assert netns.free_subnet_prefix() == "169.254.90"
    host["text"] = "".join(f"1: b inet {p}.1/24\n" for p in netns.SUBNET_PREFIXES)
    with pytest.raises(netns.NamespaceError, match="in use"):
        netns.free_subnet_prefix()


def test_a_named_subnet_is_taken_when_free_and_refused_otherwise(host, monkeypatch):
    monkeypatch.setenv("GRADWIRE_SIM_SUBNET", "169.254.97")
    assert netns.free_subnet_prefix() == "169.254.97"
    monkeypatch.setenv("GRADWIRE_SIM_SUBNET", "169.254.90")
    with pytest.raises(netns.NamespaceError, match="in use"):
        netns.free_subnet_prefix()
    monkeypatch.setenv("GRADWIRE_SIM_SUBNET", "10.0.0")
    with pytest.raises(netns.NamespaceError, match="not one of"):
        netns.free_subnet_prefix()


def test_the_ps_listens_on_the_chosen_subnet():
    network = netns.WorkerNetwork(2, tag="x", subnet="169.254.93")
    assert network.ps_host == "169.254.93.1"
