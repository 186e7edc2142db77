"""Handing file-mapped weight pages back after a model's turn: RSS falls, no value changes, written and ordinary
memory is never touched."""

import mmap
import sys

import psutil
import pytest
import torch

from klein_nodes.models.pages import PAGE, release

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/pagemap is Linux's")


def mapped_module(tmp_path, megabytes=64):
    path = tmp_path / "weights.bin"
    values = torch.arange(megabytes * 2**18, dtype=torch.float32)  # 4 bytes each
    path.write_bytes(values.numpy().tobytes())
    with open(path, "rb") as f:
        buffer = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.float32)
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(buffer.view(-1, 1024), requires_grad=False)
    return module, values.view(-1, 1024)


def rss():
    return psutil.Process().memory_info().rss


def test_file_pages_go_back_and_come_back_with_the_same_values(tmp_path):
    module, expected = mapped_module(tmp_path)
    assert torch.equal(module.weight, expected)  # every page read: resident
    before = rss()
    released = release(module)
    assert released >= 60 * 2**20 and before - rss() >= 48 * 2**20
    assert torch.equal(module.weight, expected)  # faulted back in from the file


def test_pages_written_in_place_are_kept(tmp_path):
    module, expected = mapped_module(tmp_path, megabytes=8)
    assert torch.equal(module.weight, expected)
    row = PAGE // 4 // 1024 * 40 + 1  # somewhere past the first pages
    module.weight.data[row].fill_(-7.0)  # through .data: torch's version counter does not see it, the page table does
    expected[row] = -7.0
    assert release(module) > 0
    assert torch.equal(module.weight, expected)


def test_ordinary_memory_is_never_released():
    module = torch.nn.Linear(1024, 1024)
    weight = module.weight.detach().clone()
    assert release(module) == 0
    assert torch.equal(module.weight, weight)
