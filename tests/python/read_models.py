"""Real model-loading clients reading through an arenafs mount (tests/it/client.rs).

Two modes:

  read_models.py make NAS_DIR
      Writes small, deterministic model files under NAS_DIR with numpy (seeded RNG):
      safetensors files through `safetensors.numpy.save_file` (tensors of several dtypes, one file
      larger than 8 MiB so it spans several 4 MiB cache chunks) and a gguf file through
      `gguf.GGUFWriter` (metadata keys and f32/f16 tensors). Prints each file's path relative to
      NAS_DIR, one per line.

  read_models.py compare NAS_DIR MOUNT_DIR REL...
      Opens each REL both under MOUNT_DIR and under NAS_DIR the way ComfyUI's loaders do:
      `.safetensors` with `safetensors.safe_open(path, framework="np")` (which mmaps the file),
      `.gguf` with `gguf.GGUFReader(path)` (a shared `numpy.memmap`). Reads every tensor from both
      and compares them (names, dtypes or types, shapes, values, metadata). Prints one line per
      file and exits 1 if anything differs.

Needs only numpy, safetensors and gguf (the venv made by scripts/install-deps).
"""

import os
import sys

import gguf
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

MiB = 1 << 20


def _normal(rng, shape, dtype):
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def make(nas):
    """Writes the test models under `nas` and returns their relative paths."""
    rng = np.random.default_rng(20240611)
    files = []

    def path(rel):
        files.append(rel)
        p = os.path.join(nas, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    # Two LoRAs of about 1.5 and 3 MB, with several dtypes and odd sizes (no tensor aligned to a
    # page or a chunk).
    for i, rank in enumerate([48, 96]):
        tensors = {}
        for layer in range(4):
            tensors[f"lora_unet_block_{layer}.lora_down.weight"] = _normal(rng, (rank, 1280 + 3 * layer), np.float16)
            tensors[f"lora_unet_block_{layer}.lora_up.weight"] = _normal(rng, (1280 + 5 * layer, rank), np.float32)
            tensors[f"lora_unet_block_{layer}.alpha"] = np.array(rank, dtype=np.float32)
        tensors["steps"] = rng.integers(-(2**62), 2**62, size=(7,), dtype=np.int64)
        tensors["mask"] = rng.integers(0, 255, size=(3001,), dtype=np.uint8)
        save_file(tensors, path(f"loras/style_{i}.safetensors"), metadata={"ss_network_dim": str(rank)})

    # A checkpoint of about 11 MB: three chunks and a tail, tensors straddling chunk boundaries.
    tensors = {
        "model.diffusion_model.input_blocks.0.weight": _normal(rng, (1500, 1501), np.float32),
        "model.diffusion_model.out.weight": _normal(rng, (777, 1111), np.float16),
        "model.diffusion_model.out.bias": _normal(rng, (12345,), np.float64),
        "first_stage_model.scale": rng.integers(-1000, 1000, size=(333, 3), dtype=np.int32),
        "cond_stage_model.position_ids": np.arange(77, dtype=np.int64).reshape(1, 77),
        "cond_stage_model.flags": rng.integers(0, 2, size=(999,)).astype(np.bool_),
    }
    # One metadata key per file: safetensors writes the metadata map in hash order, so several keys
    # would make the header differ from run to run.
    save_file(tensors, path("checkpoints/model.safetensors"), metadata={"note": "arenafs test"})

    # A gguf diffusion model of about 5 MB: metadata of several types, f32 and f16 tensors.
    writer = gguf.GGUFWriter(path("diffusion_models/unet.gguf"), arch="flux")
    writer.add_name("arenafs test unet")
    writer.add_uint32("flux.block_count", 19)
    writer.add_float32("flux.guidance_scale", 3.5)
    writer.add_bool("flux.test", True)
    writer.add_array("flux.layer_sizes", [3072, 1536, 768, 5])
    writer.add_array("flux.layer_names", ["double", "single", "final"])
    for layer in range(3):
        writer.add_tensor(f"double_blocks.{layer}.img_attn.qkv.weight", _normal(rng, (307, 1024 + layer), np.float32))
        writer.add_tensor(f"double_blocks.{layer}.img_mlp.0.weight", _normal(rng, (513, 1024), np.float16))
    writer.add_tensor("final_layer.linear.bias", _normal(rng, (64,), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return files


def compare_safetensors(a_path, b_path):
    """Differences between two safetensors files, read as numpy arrays; and the tensor count."""
    diffs = []
    with safe_open(a_path, framework="np") as a, safe_open(b_path, framework="np") as b:
        if a.metadata() != b.metadata():
            diffs.append(f"metadata {a.metadata()!r} != {b.metadata()!r}")
        if sorted(a.keys()) != sorted(b.keys()):
            diffs.append(f"tensor names {sorted(a.keys())} != {sorted(b.keys())}")
        for name in sorted(set(a.keys()) & set(b.keys())):
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape:
                diffs.append(f"{name}: {x.dtype}{x.shape} != {y.dtype}{y.shape}")
            elif not np.array_equal(x, y):
                diffs.append(f"{name}: values differ")
        return diffs, len(a.keys())


def _field(f):
    return [int(t) for t in f.types], f.contents() if f.types else None


def compare_gguf(a_path, b_path):
    """Differences between two gguf files (metadata and tensors); and the tensor count."""
    diffs = []
    a, b = gguf.GGUFReader(a_path), gguf.GGUFReader(b_path)
    if list(a.fields) != list(b.fields):
        diffs.append(f"field names {list(a.fields)} != {list(b.fields)}")
    for name in a.fields.keys() & b.fields.keys():
        if _field(a.fields[name]) != _field(b.fields[name]):
            diffs.append(f"field {name}: {_field(a.fields[name])!r} != {_field(b.fields[name])!r}")
    if [t.name for t in a.tensors] != [t.name for t in b.tensors]:
        diffs.append("tensor names differ")
    for x, y in zip(a.tensors, b.tensors):
        if (x.tensor_type, list(x.shape), x.n_bytes, x.data_offset) != (
            y.tensor_type,
            list(y.shape),
            y.n_bytes,
            y.data_offset,
        ):
            diffs.append(f"{x.name}: {x.tensor_type.name}{list(x.shape)} != {y.tensor_type.name}{list(y.shape)}")
        elif x.data.tobytes() != y.data.tobytes():
            diffs.append(f"{x.name}: data differs")
    return diffs, len(a.tensors)


def compare(nas, mnt, rels):
    """Compares each file through the mount with the NAS; returns the number that differ."""
    bad = 0
    for rel in rels:
        via_mount, direct = os.path.join(mnt, rel), os.path.join(nas, rel)
        if rel.endswith(".safetensors"):
            diffs, n = compare_safetensors(via_mount, direct)
        elif rel.endswith(".gguf"):
            diffs, n = compare_gguf(via_mount, direct)
        else:
            raise SystemExit(f"not a model file: {rel}")
        size = os.path.getsize(via_mount)
        if diffs:
            bad += 1
            print(f"DIFFERS {rel} ({n} tensors, {size} bytes): " + "; ".join(diffs))
        else:
            print(f"same {rel} ({n} tensors, {size} bytes)")
    return bad


def main(argv):
    if len(argv) == 2 and argv[0] == "make":
        for rel in make(argv[1]):
            print(rel)
        return 0
    if len(argv) >= 4 and argv[0] == "compare":
        return 1 if compare(argv[1], argv[2], argv[3:]) else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
