"""Write the torch.save fixtures the Rust tests read, and what torch itself makes of them.

Normal fixtures get a reference dump `<name>.json`: for every flattened key, the safetensors dtype, the shape
and the sha256 of the contiguous bytes as `torch.load(weights_only=True)` returns them. Hostile fixtures are
hand-built zips/pickles; torch's refusal of each is printed (for the record, not asserted by the Rust side).

Run with the project's Python: `/work/main/.venv/bin/python tests/gen_fixtures.py`.
"""

import collections
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

ST_DTYPE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.complex64: "C64",
}


def flatten(obj, prefix=""):
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            yield name, v
        elif isinstance(v, dict):
            yield from flatten(v, name + ".")


def tensor_bytes(t):
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def save_normal(name, obj):
    path = os.path.join(OUT, name + ".bin")
    torch.save(obj, path)
    loaded = torch.load(path, weights_only=True)
    ref = {}
    for key, t in flatten(loaded):
        data = tensor_bytes(t)
        ref[key] = {
            "dtype": ST_DTYPE[t.dtype],
            "shape": list(t.shape),
            "sha256": hashlib.sha256(data).hexdigest(),
            "nbytes": len(data),
        }
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(ref, f, indent=1)


def g(seed):
    return torch.Generator().manual_seed(seed)


def every_dtype():
    out = {}
    base = torch.randn(2, 3, generator=g(0)) * 4
    for i, dt in enumerate(ST_DTYPE):
        if dt.is_complex:
            t = torch.complex(base, -base)
        elif dt == torch.bool:
            t = base > 0
        elif dt in (torch.uint16, torch.uint32, torch.uint64, torch.uint8):
            t = base.abs().to(torch.int64).to(dt)
        else:
            t = base.to(dt)
        out[f"t{i}_{ST_DTYPE[dt].lower()}"] = t
    return out


def views():
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    return {
        "base": base,
        "row_slice": base[2:4],  # contiguous, storage offset 20
        "col_slice": base[:, 3:7],  # strided
        "step": base[::2, ::3],
        "transposed": base.t(),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "scalar_view": base[1, 2],  # 0-d view with offset
        "empty": torch.empty(0, 4, dtype=torch.float16),
        "empty_view": base[3:3],
        "expanded": torch.arange(3, dtype=torch.int32).unsqueeze(0).expand(4, 3),  # stride 0
    }


def shared():
    w = torch.randn(4, 4, generator=g(1))
    return {"a.weight": w, "b.weight": w, "first_half": w[:2], "t": w.t()}


def params_nested():
    lin = torch.nn.Linear(3, 2)
    inner = collections.OrderedDict(
        [("w", torch.nn.Parameter(torch.randn(2, 2, generator=g(2)))), ("v", torch.ones(3, dtype=torch.bfloat16))]
    )
    return {
        "param": torch.nn.Parameter(torch.randn(3, generator=g(3))),
        "frozen": torch.nn.Parameter(torch.randn(3, generator=g(4)), requires_grad=False),
        "model": lin.state_dict(),
        "nested": {"inner": inner, "step": 7, "name": "adapter", "none": None},
        "epoch": 3,
    }


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    return model.state_dict()  # carries `_metadata`, and lm_head.weight ties wte.weight


def linear_metadata():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).state_dict()


# ---------------------------------------------------------------------------------------------- hostile


def torch_zip(path, pkl, storages=(), byteorder=b"little", root="archive", names=None, deflate=()):
    """A zip laid out the way torch.save lays it out (stored entries, `<root>/...`)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        entries = names or [f"{root}/data.pkl", f"{root}/byteorder"] + [f"{root}/data/{k}" for k, _ in storages]
        payloads = [pkl, byteorder] + [v for _, v in storages]
        if names is None:
            entries.append(f"{root}/version")
            payloads.append(b"3\n")
        for n, p in zip(entries, payloads):
            if p is None:
                continue
            z.writestr(n, p, compress_type=zipfile.ZIP_DEFLATED if n in deflate else zipfile.ZIP_STORED)


def proto(body):
    return b"\x80\x02" + body + b"."


def global_op(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def unicode(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def hostile():
    out = {}
    # GLOBAL + REDUCE on dangerous callables, wrapped as {'x': call(arg)}.
    for mod, name in [("os", "system"), ("builtins", "eval"), ("builtins", "exec"), ("subprocess", "Popen"), ("posix", "system")]:
        body = b"}(" + unicode("x") + global_op(mod, name) + unicode("echo pwned") + b"\x85R" + b"u"
        out[f"global_{mod}_{name}"] = proto(body)
    out["reduce_class"] = pickle.dumps({"x": Evil()}, protocol=2)
    # Memo bomb: level i+1 is a list holding level i twice, so 60 levels are 2^60 leaves when walked.
    keys = unicode("x0") + b"j" + struct.pack("<I", 0)
    for i in range(60):
        bomb = b"](j" + struct.pack("<I", i) + b"j" + struct.pack("<I", i) + b"er" + struct.pack("<I", i + 1)
        keys += unicode(f"x{i + 1}") + bomb
    out["memo_bomb"] = proto(b"}(" + unicode("l") + b"]r" + struct.pack("<I", 0) + keys + b"u")
    out["huge_unicode"] = proto(b"X" + struct.pack("<I", 0xFFFFFFF0) + b"abc")
    out["huge_binbytes"] = proto(b"B" + struct.pack("<I", 0xFFFFFFF0) + b"abc")
    out["deep_mark"] = proto(b"(" * 100000 + b"}")
    out["deep_list"] = proto(b"}(" + unicode("x") + b"]" * 100000 + b"a" * 99999 + b"u")
    out["inst_opcode"] = proto(b"ios\nsystem\n")
    out["truncated_pickle"] = proto(b"}(" + unicode("x"))[:-3]
    out["stack_underflow"] = proto(b"u")
    out["not_dict"] = proto(b"K\x05")
    return out


def oob_view_pickle():
    """{'w': a view of 4 floats at offset 2 of a 4-float storage}: reaches 2 elements past the end."""
    storage = b"(" + unicode("storage") + global_op("torch", "FloatStorage") + unicode("0") + unicode("cpu") + b"K\x04tQ"
    args = storage + b"K\x02K\x04\x85K\x01\x85\x89" + global_op("collections", "OrderedDict") + b")R"
    call = global_op("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"
    return proto(b"}" + unicode("w") + call + b"s")


def flip_storage_byte(src, dst):
    data = bytearray(open(src, "rb").read())
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + 1] ^= 0x40
    open(dst, "wb").write(data)


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, build in [
        ("every_dtype", every_dtype),
        ("views", views),
        ("shared", shared),
        ("params_nested", params_nested),
        ("gpt2", gpt2),
        ("linear_metadata", linear_metadata),
    ]:
        save_normal(name, build())
    # Same content under a different root folder name and an OrderedDict top level.
    save_normal("renamed_root_x", collections.OrderedDict(views()))

    hdir = os.path.join(OUT, "hostile")
    os.makedirs(hdir, exist_ok=True)
    for name, pkl in hostile().items():
        torch_zip(os.path.join(hdir, name + ".bin"), pkl)
    ok_pkl = zipfile.ZipFile(os.path.join(OUT, "views.bin")).read("views/data.pkl")
    torch_zip(os.path.join(hdir, "zip_slip.bin"), ok_pkl, names=["archive/data.pkl", "archive/../evil"])
    torch_zip(os.path.join(hdir, "other_root.bin"), ok_pkl, names=["archive/data.pkl", "elsewhere/byteorder"])
    torch_zip(os.path.join(hdir, "deflated.bin"), ok_pkl, deflate=("archive/data.pkl",))
    torch_zip(os.path.join(hdir, "big_endian.bin"), ok_pkl, byteorder=b"big")
    data = open(os.path.join(OUT, "views.bin"), "rb").read()
    open(os.path.join(hdir, "truncated.bin"), "wb").write(data[: len(data) // 2])
    flip_storage_byte(os.path.join(OUT, "views.bin"), os.path.join(hdir, "crc_flip.bin"))
    # A view that reaches past its storage: patch the stored numel? Simpler: drop the storage entry.
    torch_zip(os.path.join(hdir, "missing_storage.bin"), ok_pkl)
    torch_zip(os.path.join(hdir, "oob_view.bin"), oob_view_pickle(), storages=[("0", struct.pack("<4f", 1, 2, 3, 4))])
    torch.save({"w": torch.ones(2)}, os.path.join(hdir, "legacy.bin"), _use_new_zipfile_serialization=False)
    # A real torch.save: one 4-byte storage expanded (stride 0) to 2^40 elements, i.e. 4 TiB once gathered.
    torch.save({"w": torch.ones(1).expand(1 << 40)}, os.path.join(hdir, "expand_bomb.bin"))

    # For the record: what torch.load(weights_only=True) says about each hostile file.
    for name in sorted(os.listdir(hdir)):
        try:
            torch.load(os.path.join(hdir, name), weights_only=True)
            verdict = "LOADED"
        except Exception as e:  # noqa: BLE001 - we only print
            lines = [ln for ln in str(e).splitlines() if "Unsupported" in ln or "unsupported" in ln] or [str(e)]
            verdict = f"{type(e).__name__}: {lines[0].strip()[:130]}"
        print(f"{name:28} {verdict}", file=sys.stderr)


if __name__ == "__main__":
    main()
