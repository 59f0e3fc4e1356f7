"""Issue 23: the kernel is an extension built at install, one library with a code path per instruction set that
all compute the same bits in one defined order; nothing executable comes from $KVCHAT_HOME; an install without
a C compiler still chats, on float32 weights, and `kvchat info` says why."""

import io
import os
import shutil
import subprocess
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from kvchat.weights import quant

ROOT = Path(__file__).resolve().parent.parent


def kernel(path):
    built = quant.Kernel(path=path)
    if not built.build():
        if path == "avx2" and "not run by this CPU" in built.failure:
            pytest.skip("this CPU does not run the avx2 path")
        pytest.fail(f"the kernel's {path} path is not usable here: {built.failure}")
    return built


def paths():
    return [kernel("scalar"), kernel("avx2")]


# ---- the defined order, computed in exact arithmetic with one float32 rounding an operation ----

def f32(value: Fraction) -> float:
    """`value` rounded to the nearest float32, ties to even (no overflow in these tests)."""
    if value == 0:
        return 0.0
    magnitude = abs(value)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:
        exponent -= 1
    quantum = Fraction(2) ** (max(exponent, -126) - 23)
    rounded = float(round(magnitude / quantum) * quantum)  # round(): ties to even
    return rounded if value > 0 else -rounded


def add(a, b):
    return f32(Fraction(a) + Fraction(b))


def mul(a, b):
    return f32(Fraction(a) * Fraction(b))


def fma(a, b, c):
    return f32(Fraction(a) * Fraction(b) + Fraction(c))


def lanes(e):
    return add(add(add(e[0], e[4]), add(e[2], e[6])), add(add(e[1], e[5]), add(e[3], e[7])))


def defined_product(x, q, scale, offset):
    """y = x @ w.T for a packed weight, in the order kernels/packed_matvec.c defines (see its top comment)."""
    rows, blocks = scale.shape
    size = q.shape[1] // blocks  # 32, or 16 (the form of GGUF's Q6_K)
    y = torch.empty(x.shape[0], rows)
    for v, xv in enumerate(x.tolist()):
        sums = []
        for b in range(blocks):
            total = 0.0
            for value in xv[size * b:size * b + size]:
                total = add(total, value)
            sums.append(total)
        for r in range(rows):
            w = [float(value) for value in q[r].tolist()]
            s, o = scale[r].tolist(), offset[r].tolist()
            acc = [[0.0] * 8, [0.0] * 8]
            for b in range(blocks):
                xb, wb = xv[size * b:size * b + size], w[size * b:size * b + size]
                dot = [mul(xb[l], wb[l]) for l in range(8)]
                for k in range(1, size // 8):
                    dot = [fma(xb[8 * k + l], wb[8 * k + l], dot[l]) for l in range(8)]
                acc[b & 1] = [fma(dot[l], s[b], acc[b & 1][l]) for l in range(8)]
            shift_lanes, b = [0.0] * 8, 0
            while b + 8 <= blocks:
                shift_lanes = [add(shift_lanes[l], mul(o[b + l], sums[b + l])) for l in range(8)]
                b += 8
            shift = 0.0
            for value in shift_lanes:
                shift = add(shift, value)
            for rest in range(b, blocks):
                shift = add(shift, mul(o[rest], sums[rest]))
            y[v, r] = add(lanes([add(acc[0][l], acc[1][l]) for l in range(8)]), shift)
    return y


def weights(rows, blocks, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, blocks * quant.BLOCK), dtype=torch.int8, generator=generator)
    scale = (torch.rand(rows, blocks, generator=generator) * 0.02).half().float()
    offset = (torch.randn(rows, blocks, generator=generator) * 0.1).half().float()
    return q, scale, offset


@pytest.mark.parametrize("rows,blocks,vectors", [(3, 1, 1), (5, 2, 2), (4, 9, 1), (3, 17, 2)])
def test_every_path_computes_the_defined_order_bit_for_bit(rows, blocks, vectors):
    q, scale, offset = weights(rows, blocks, seed=rows * 100 + blocks)
    x = torch.randn(vectors, blocks * quant.BLOCK, generator=torch.Generator().manual_seed(blocks))
    want = defined_product(x, q, scale, offset)
    nibbles = quant.narrow(q, scale, offset)
    assert nibbles is not None
    for path in paths():
        assert torch.equal(path(x, q, scale, offset), want), path.path
        assert torch.equal(path(x, *nibbles), want), path.path  # the 4-bit form: the same bits
    assert not torch.equal(want, x @ quant.unpack(q, scale, offset).T)  # (an order of its own, not torch's)


@pytest.mark.parametrize("rows,blocks,vectors", [(3, 1, 1), (4, 9, 1), (3, 17, 2)])
def test_the_forms_of_k_quants_compute_the_defined_order_bit_for_bit(rows, blocks, vectors):
    """Q4_K's form (4 bits, float32 scales and offsets: a float16 times a 6-bit integer) and Q6_K's (int8 values
    in 16-input blocks, with and without offsets)."""
    generator = torch.Generator().manual_seed(rows * 10 + blocks)
    q, _, _ = weights(rows, blocks, seed=blocks)
    d = (torch.rand(rows, 1, generator=generator) * 0.002).half().float()
    scale = d * torch.randint(0, 64, (rows, blocks), generator=generator).float()
    offset = -(d * torch.randint(0, 64, (rows, blocks), generator=generator).float())
    x = torch.randn(vectors, blocks * quant.BLOCK, generator=generator)
    want = defined_product(x, q, scale, offset)
    nibbles = quant.narrow(q, scale, offset)
    assert nibbles is not None and nibbles[1].dtype == torch.float32
    q16 = torch.randint(-32, 32, (rows, blocks * quant.BLOCK), dtype=torch.int8, generator=generator)
    scale16 = d * torch.randint(-128, 128, (rows, 2 * blocks), generator=generator).float()
    offset16 = torch.randn(rows, 2 * blocks, generator=generator) * 0.05
    for path in paths():
        assert torch.equal(path(x, q, scale, offset), want), path.path
        assert torch.equal(path(x, *nibbles), want), path.path
        for offsets in (offset16, torch.zeros_like(offset16)):
            assert torch.equal(path(x, q16, scale16, offsets), defined_product(x, q16, scale16, offsets)), path.path
            assert torch.equal(path.weight(q16, scale16, offsets), quant.unpack(q16, scale16, offsets)), path.path


@pytest.mark.parametrize("kind", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,blocks,vectors", [(3, 1, 1), (4, 9, 1), (3, 17, 2)])
def test_16_bit_float_weights_compute_the_defined_order_bit_for_bit(kind, rows, blocks, vectors):
    """A bfloat16 or float16 model's matrices kept as they are: the 32-input form with scales of 1 and no
    offsets, and widened exactly (a negative zero and a float16 subnormal among them)."""
    generator = torch.Generator().manual_seed(rows * 7 + blocks)
    weight = (torch.randn(rows, blocks * quant.BLOCK, generator=generator) * 0.1).to(kind)
    weight[0, 0], weight[-1, -1] = -0.0, 6e-8
    x = torch.randn(vectors, blocks * quant.BLOCK, generator=generator)
    want = defined_product(x, weight.float(), torch.ones(rows, blocks), torch.zeros(rows, blocks))
    packing = quant.wide(weight)[:3]
    for path in paths():
        assert torch.equal(path(x, *packing), want), path.path
        widened = path.weight(*packing)
        assert torch.equal(widened, weight.float()) and torch.equal(widened.signbit(), weight.signbit()), path.path
    assert not torch.equal(want, x @ weight.float().T)  # (an order of its own, not torch's)


@pytest.mark.parametrize("rows,supers,vectors", [(3, 1, 1), (2, 2, 2)])
def test_the_6_bit_form_of_q6_k_computes_the_defined_order_bit_for_bit(rows, supers, vectors):
    """Q6_K's own layout (6-bit values, an int8 sub-scale per 16 inputs and a float16 per 256): the defined order
    of 16-input blocks, as its int8 form computes it, to the bit."""
    generator = torch.Generator().manual_seed(rows * 3 + supers)
    q = torch.randint(-32, 32, (rows, supers * 256), dtype=torch.int8, generator=generator)
    q[0, :8], q[-1, -8:] = -32, 31
    d = (torch.rand(rows, supers, 1, generator=generator) * 0.002 + 1e-4).half().float()
    sub = torch.randint(-128, 128, (rows, supers, 16), generator=generator).float()
    sub[..., 0] = -128
    scale = (d * sub).reshape(rows, supers * 16)
    zero = torch.zeros_like(scale)
    six = quant.narrow6(q, scale, zero)
    assert six is not None
    x = torch.randn(vectors, supers * 256, generator=generator)
    want = defined_product(x, q, scale, zero)
    for path in paths():
        assert torch.equal(path(x, *six), want), path.path
        assert torch.equal(path(x, q, scale, None), want), path.path  # (its int8 form: the same bits)
        assert torch.equal(path.weight(*six), quant.unpack(q, scale, zero)), path.path


def test_zero_offsets_not_given_are_the_same_product():
    """A symmetric packing (Q8_0, Q4_0: every offset zero) goes to the kernel without its offsets, which are then
    never read: the same bits as with them, and the defined order's."""
    q, scale, _ = weights(6, 9, seed=5)
    wide = torch.randint(-127, 128, q.shape, dtype=torch.int8, generator=torch.Generator().manual_seed(5))
    zero = torch.zeros_like(scale)
    x = torch.randn(2, q.shape[1], generator=torch.Generator().manual_seed(6))
    want = defined_product(x, wide, scale, zero)
    for path in paths():
        assert torch.equal(path(x, wide, scale, None), want) and torch.equal(path(x, wide, scale, zero), want)
        four = quant.narrow(q, scale, zero)
        assert torch.equal(path(x, four[0], four[1], None), path(x, *four))


def test_the_paths_agree_bit_for_bit_on_the_default_models_shapes():
    """Both paths on real shapes, every 32-input form (4 bits with float16 and float32 scales, int8 with and
    without offsets, bfloat16 and float16 values)."""
    scalar, avx2 = paths()
    for rows, cols, vectors, seed in ((576, 576, 1, 1), (1536, 576, 2, 2), (577, 1536, 1, 3), (193, 576, 3, 4)):
        q, scale, offset = weights(rows, cols // quant.BLOCK, seed)
        x = torch.randn(vectors, cols, generator=torch.Generator().manual_seed(seed)) * 3
        floats = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05).to(torch.bfloat16)
        for form in ((q, scale, offset), quant.narrow(q, scale, offset), quant.narrow(q, scale, offset + 1e-3),
                     quant.wide(floats)[:3], quant.wide(floats.half())[:3]):
            assert torch.equal(scalar(x, *form), avx2(x, *form)), (rows, cols)
            assert torch.equal(scalar.weight(*form), avx2.weight(*form))
        wide = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(scalar(x, wide, scale, offset), avx2(x, wide, scale, offset))  # int8 values beyond 4 bits
        assert torch.equal(scalar(x, wide, scale, None), avx2(x, wide, scale, None))


def test_info_names_the_path_in_use(monkeypatch, capsys, tiny_model_dir, tmp_path):
    from kvchat.ui.cli import main

    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "home"))
    assert main(["info", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"kernel: the {quant.KERNEL.path} path (built at install with: scalar avx2;" in out, out


def copy_library(into: Path) -> Path:
    (found,) = [p for p in Path(quant.__file__).parent.glob("_kernel*") if p.suffix in (".so", ".pyd", ".dylib")]
    into.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(found, into / found.name))


def test_a_library_built_from_other_sources_is_refused_in_one_line(monkeypatch, tmp_path):
    """A checkout whose C source changed after `pip install -e .` must not run the old code as if it were new."""
    sources = tmp_path / "kernels"
    shutil.copytree(quant.Kernel.SOURCES, sources)
    with open(sources / "packed_matvec.c", "a", encoding="utf-8") as handle:
        handle.write("/* an edit after the build */\n")
    monkeypatch.setattr(quant.Kernel, "SOURCES", sources)
    stale = quant.Kernel()
    assert not stale.build() and stale.step is None and stale.function is None
    assert stale.failure == ("the kernel library was built from other sources than this kvchat's; reinstall "
                             "kvchat (pip install -e . in a checkout)")


def test_a_linked_library_is_refused_and_a_copy_in_its_place_is_used(tmp_path):
    library = copy_library(tmp_path / "real")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / library.name).symlink_to(library)
    linked = quant.Kernel(directory=tmp_path / "linked")
    assert not linked.build() and linked.failure == f"the kernel library {library.name} is not a regular file"
    assert quant.Kernel(directory=library.parent).build()


def test_nothing_executable_is_mapped_from_kvchat_home(monkeypatch, capsys, tmp_path):
    """A chat on packed weights writes its packed model in $KVCHAT_HOME and maps it; no executable mapping, and
    no kernel folder, comes from there (the kernel was built at run time into $KVCHAT_HOME before)."""
    from kvchat.ui.cli import main
    from kvchat.weights.model import pack_directory
    from test_quant import gguf_like

    loaded = gguf_like()
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    assert pack_directory(tmp_path / "m")
    home = tmp_path / "home"
    monkeypatch.setenv("KVCHAT_HOME", str(home))
    monkeypatch.setattr(quant, "KERNEL", quant.Kernel())
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8"))
    code = main(["--model", str(tmp_path / "m"), "--temperature", "0", "--max-new-tokens", "4", "--session", "s",
                 "-p", "Hello!"])
    err = capsys.readouterr().err
    assert code == 0 and quant.KERNEL.path is not None, err
    with open("/proc/self/maps", encoding="utf-8") as maps:
        executable = [line for line in maps if line.split()[1][2] == "x"]
    assert any("_kernel" in line for line in executable)  # (the kernel is mapped, from the package)
    assert not [line for line in executable if str(home) in line], executable
    assert home.is_dir() and not (home / "kernels").exists()


def test_an_install_without_a_c_compiler_chats_on_float32_weights_and_info_says_why(tmp_path, tiny_model_dir):
    """pip builds kvchat where `cc` fails: the install succeeds without the library, a chat answers, and `kvchat
    info` gives the reason in one line."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "kvchat", source / "kvchat",
                    ignore=shutil.ignore_patterns("__pycache__", "_kernel*", "*.egg-info"))
    broken = tmp_path / "bin" / "cc"
    broken.parent.mkdir()
    broken.write_text("#!/bin/sh\necho 'cc: no compiler here' >&2\nexit 1\n")
    broken.chmod(0o755)
    env = {**os.environ, "CC": str(broken), "LDSHARED": f"{broken} -shared", "PIP_NO_INPUT": "1"}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheels"), str(source)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("kvchat-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kvchat/weights/kernels/packed_matvec.c" in names and not [n for n in names if "_kernel" in n]
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    env = {**os.environ, "PYTHONPATH": str(target), "KVCHAT_HOME": str(tmp_path / "home")}
    probe = ("import sys, kvchat; assert kvchat.__file__.startswith(sys.argv[1]), kvchat.__file__; "
             "from kvchat.ui.cli import main; raise SystemExit(main(sys.argv[2:]))")
    info = subprocess.run([sys.executable, "-c", probe, str(target), "info", "--model", str(tiny_model_dir)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr[-2000:]
    assert ("kernel: none, weights stay float32 (kvchat was installed without its C kernel (no working C compiler "
            "at install); reinstall it where gcc or clang runs)") in info.stdout, info.stdout
    chat = subprocess.run([sys.executable, "-c", probe, str(target), "--model", str(tiny_model_dir),
                           "--temperature", "0", "--max-new-tokens", "4", "-p", "Hello!"],
                          env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-2000:]
