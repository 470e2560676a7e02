"""pycosdist.features: distilling any teacher/student nn.Module by module name."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

from pycosdist import reference
from pycosdist.features import LatentDistiller, LatentTap, freeze

ROOT = Path(__file__).resolve().parents[2]


class Conv2dNet(nn.Module):
    """(B, 1, F, T) -> (B, 1, F, T) with a (B, C, F/2, T) bottleneck named 'body.1'."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, c, 3, (2, 1), 1), nn.Conv2d(c, c, 3, 1, 1), nn.ELU())
        self.head = nn.ConvTranspose2d(c, 1, (4, 3), (2, 1), (1, 1))

    def forward(self, x):
        return self.head(self.body(x))


class SeqNet(nn.Module):
    """(B, T, F) -> (B, T, F); 'rnn' gives (B, T, H) (a tuple output), 'conv' gives (B, H, T)."""

    def __init__(self, h: int):
        super().__init__()
        self.rnn = nn.GRU(8, h, batch_first=True)
        self.conv = nn.Conv1d(h, h, 3, padding=1)
        self.out = nn.Linear(h, 8)

    def forward(self, x):
        y = self.conv(self.rnn(x)[0].transpose(1, 2))
        return self.out(y.transpose(1, 2))


def _lib_reference(kd: LatentDistiller, s: torch.Tensor, t: torch.Tensor, layout: str) -> torch.Tensor:
    lib = kd.loss.lib
    return reference.lib_cosine_distance_loss(s.double(), t.double(), lib.expand.weight.double(),
                                              lib.expand.bias.double(), lib.project.weight.double(),
                                              lib.project.bias.double(), layout=layout)


def test_bcft_latents_match_the_reference_loss_and_gradients():
    torch.manual_seed(0)
    teacher, student = freeze(Conv2dNet(12)), Conv2dNet(4)
    x = torch.randn(3, 1, 16, 10)
    kd = LatentDistiller(teacher, student, "body.1", "body.1", example_input=x[:1])
    assert kd.loss.lib.in_dim == 4 * 8 and kd.loss.lib.out_dim == 12 * 8
    out, loss = kd(x)
    torch.testing.assert_close(out, student(x))  # the student's own output
    s = student.body[1](student.body[0](x))  # the latents, computed without hooks
    t = teacher.body[1](teacher.body[0](x)).detach()
    ref = _lib_reference(kd, s, t, "bcft")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    w = kd.loss.lib.expand.weight
    w64 = w.detach().double().requires_grad_()
    lib = kd.loss.lib
    ref2 = reference.lib_cosine_distance_loss(s.detach().double(), t.double(), w64, lib.expand.bias.double(),
                                              lib.project.weight.double(), lib.project.bias.double(), layout="bcft")
    (g_ref,) = torch.autograd.grad(ref2, w64)
    torch.testing.assert_close(w.grad.double(), g_ref, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in teacher.parameters())
    assert student.body[0].weight.grad is not None  # the KD gradient reaches the student


@pytest.mark.parametrize("s_layer,s_layout", [("rnn", "btd"), ("conv", "bdt")])
def test_sequence_layouts_and_tuple_outputs(s_layer, s_layout):
    torch.manual_seed(1)
    teacher, student = freeze(SeqNet(24)), SeqNet(6)
    x = torch.randn(2, 7, 8)
    kd = LatentDistiller(teacher, student, "rnn", s_layer, layout=s_layout, teacher_layout="btd",
                         example_input=x)
    assert kd.loss.lib.in_dim == 6 and kd.loss.lib.out_dim == 24
    _, loss = kd(x)
    s = student.rnn(x)[0]
    if s_layer == "conv":
        s = student.conv(s.transpose(1, 2)).transpose(1, 2)  # frames leading
    t = teacher.rnn(x)[0]
    torch.testing.assert_close(loss.double(), _lib_reference(kd, s, t, "nd"), rtol=1e-5, atol=1e-6)


def test_cached_teacher_latent_gives_the_same_loss():
    torch.manual_seed(2)
    teacher, student = freeze(Conv2dNet(8)), Conv2dNet(4)
    x = torch.randn(2, 1, 16, 5)
    kd = LatentDistiller(teacher, student, "body.1", "body.1", example_input=x)
    cached = kd.teacher_latent(x)
    torch.testing.assert_close(kd(x)[1], kd(x, teacher_latent=cached)[1])


def test_parameters_are_the_lib_only_and_train_mode_leaves_the_teacher_alone():
    teacher, student = freeze(Conv2dNet(8)), Conv2dNet(4)
    kd = LatentDistiller(teacher, student, "body.1", "body.1", example_input=torch.randn(1, 1, 16, 4))
    assert sorted(kd.state_dict()) == ["loss.lib.expand.bias", "loss.lib.expand.weight", "loss.lib.project.bias",
                                       "loss.lib.project.weight"]
    kd.train()
    assert not teacher.training


def test_unknown_module_name_names_the_argument_and_close_names():
    teacher, student = freeze(Conv2dNet(8)), Conv2dNet(4)
    with pytest.raises(ValueError, match=r"student_layer: Conv2dNet has no submodule named 'body\.7'.*'body\.1'"):
        LatentDistiller(teacher, student, "body.1", "body.7", example_input=torch.randn(1, 1, 16, 4))
    with pytest.raises(ValueError, match="teacher_layer: .* no submodule named 'encoder'"):
        LatentTap(teacher, "encoder", "teacher_layer")


def test_frame_count_mismatch_is_a_clear_error():
    teacher, student = freeze(SeqNet(8)), SeqNet(4)
    kd = LatentDistiller(teacher, student, "rnn", "rnn", layout="btd", student_dim=4, teacher_dim=8)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"latent frames differ: student_layer 'rnn' gives \[2, 6, 4\]"):
        kd(torch.randn(2, 6, 8), teacher_latent=teacher.rnn(x)[0])


def test_unfrozen_teacher_is_refused():
    teacher, student = Conv2dNet(8), Conv2dNet(4)
    with pytest.raises(ValueError, match="teacher: not frozen: .* require grad"):
        LatentDistiller(teacher, student, "body.1", "body.1", example_input=torch.randn(1, 1, 16, 4))
    teacher.requires_grad_(False)  # no gradients, but still in training mode
    with pytest.raises(ValueError, match="teacher: not frozen: it is in training mode"):
        LatentDistiller(teacher, student, "body.1", "body.1", example_input=torch.randn(1, 1, 16, 4))


def test_bad_layout_and_missing_widths():
    teacher, student = freeze(Conv2dNet(8)), Conv2dNet(4)
    with pytest.raises(ValueError, match="layout: expected one of"):
        LatentDistiller(teacher, student, "body.1", "body.1", layout="bft")
    with pytest.raises(ValueError, match="example_input: needed"):
        LatentDistiller(teacher, student, "body.1", "body.1")


def test_example_script_distills_a_user_model(capsys):
    """examples/distill_your_model.py: a GRU teacher and a Conv1d student (not our U-Nets)."""
    ns = runpy.run_path(str(ROOT / "examples" / "distill_your_model.py"))
    result = ns["main"](["--steps", "30"])
    h = result["history"]
    assert h[-1]["kd"] < 0.5 * h[0]["kd"]  # the LIB aligned the student's latent with the teacher's
    assert h[-1]["task"] < h[0]["task"]
    assert "cosine distance to the teacher" in capsys.readouterr().out
