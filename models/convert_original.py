"""Convert the original DeepRAFT code's released detector (`detector.pth`) into a scanner-only model folder.

    python -m models.convert_original ../shared/original/rs_aug/detector.pth --out pretrained_models/original_rs_aug
    python scan.py --model pretrained_models/original_rs_aug photo.jpg

The original repository (xinghua-qu/DeepRAFT) ships each detector as a WHOLE `model.StampDetector` module
pickled by `torch.save` (the zip format of torch ≥ 1.6): `archive/data.pkl` is a pickle of the module tree, and
`archive/data/<key>` hold the raw little-endian bytes of its tensors. Why this reader is written by hand:

- `torch.load(path, weights_only=True)` refuses the file: its pickle names the module classes (`model.StampDetector`,
  `model.Conv2D`, `torch.nn.modules.conv.Conv2d`, ...), which the weights-only unpickler does not allow, and
  allowing them (`torch.serialization.add_safe_globals`) would need the original `model` module importable
  and would construct real modules from untrusted state.
- `torch.load(path, weights_only=False)` runs the pickle: any global it names is imported and called, so a
  tampered file could run any command (`os.system`, `builtins.exec`, ...) the moment it is loaded.

So the zip is opened with `zipfile` and `data.pkl` is read by `_InertUnpickler`, whose `find_class` hands out
inert stand-ins and nothing else: the tensor-rebuilding functions become small functions here that cut tensors
out of the bytes of `data/<key>` (dtype from the storage type, bounds checked), `collections.OrderedDict` and
`set` stay what they are (plain containers), and each module class of the original tree becomes a placeholder
that only records the state pickle gives it (its `__dict__`): no class is imported, no module code runs. Any
other global is refused with an error naming it (`module.name`) before anything of it runs. Sizes are checked
before memory is spent on them: archive entries are capped, every opcode is parsed (pickletools) before any
runs, and the pure-Python unpickler keeps its memo in a dict rather than an array sized by the pickle.

The placeholder tree is then walked (`_parameters`, persistent `_buffers`, `_modules`) into a state dict, its
keys are mapped to ours (`model.0.conv.weight` → `net.model.0.conv.weight`, models.original), and the label
order is swapped: the original reads clean as class 1 and stamped as class 0, ours reads clean as class 0
(models.scanner.CLEAN), so the two rows of fc2's weight and bias are exchanged. The original returns
log_softmax of fc2's output, ours returns the logits: a per-row shift, so argmax and cross-entropy are the
same. The result loads strictly (models.io.load_state_checked) into `Scanner(ScannerConfig("deepraft",
"zeros"))` and is written as OUT/scanner.safetensors + OUT/config.json (no encoder: the original encoders are
not released, so the folder can scan but not stamp; see load_pretrained).
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import pickletools
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .io import CALIBRATION_NAME, CONFIG_NAME, ENCODER_NAME, SCANNER_NAME, _sha256, load_state_checked
from .scanner import Scanner, ScannerConfig

#: The module classes the five released detectors name (found with pickletools), each read as a placeholder.
MODULE_CLASSES = frozenset({
    "model.StampDetector", "model.Conv2D", "model.Dense",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.conv.Conv2d", "torch.nn.modules.linear.Linear",
    "torch.nn.modules.activation.Sigmoid",  # rs_aug's detector carries an unused, parameterless Sigmoid
})
#: Legacy typed storages (how torch.save names a tensor's storage type) → dtype of their bytes.
STORAGE_DTYPES = {
    "torch.FloatStorage": torch.float32, "torch.DoubleStorage": torch.float64, "torch.HalfStorage": torch.float16,
    "torch.BFloat16Storage": torch.bfloat16, "torch.LongStorage": torch.int64, "torch.IntStorage": torch.int32,
    "torch.ShortStorage": torch.int16, "torch.CharStorage": torch.int8, "torch.ByteStorage": torch.uint8,
    "torch.BoolStorage": torch.bool,
}
#: The original detector's settings that our port (models.original.DeepRAFTDetector) hard-codes: each conv's
#: (stride, padding, dilation, groups, padding_mode) and each layer's activation. Checked, so that a file whose
#: tensors have the right shapes but whose network computes something else is refused instead of mis-ported.
CONV_SETTINGS = {f"model.{i}.conv": ((2, 2) if i < 4 else (1, 1), (1, 1), (1, 1), 1, "zeros") for i in range(5)}
ACTIVATIONS = {**{f"model.{i}": "relu" for i in range(5)}, "fc1": "relu", "fc2": None}
#: The original's names → ours: the port sits under `net` in Scanner(arch='deepraft').
KEY_PREFIX = "net."
#: Largest archive entry read (the released detectors are 360 kB in all): a zip entry can claim any size when
#: decompressed, so a crafted one could otherwise exhaust memory.
MAX_ENTRY_BYTES = 256 << 20
#: Module nesting that _walk follows (the detector's is 3 deep), so that a crafted tree cannot exhaust the stack.
MAX_DEPTH = 32
#: Every setting the converted folder's config.json gives the scanner.
SCANNER_CONFIG = ScannerConfig(arch="deepraft", padding_mode="zeros")


class OriginalCheckpointError(ValueError):
    """A detector.pth that cannot be converted; the message is one line naming the file."""


# ------------------------------------------------------------------------------------------ inert stand-ins
class ModulePlaceholder:
    """Stands in for one module of the original tree. pickle creates it with `cls.__new__(cls)` (NEWOBJ) and
    hands it the module's `__dict__` through `__setstate__`, which only keeps it: nothing is called on it."""

    class_name = "?"  # `module.Class` the pickle named; set on the per-class subclass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<placeholder for {self.class_name}>"


class _Sealed:
    """pickle's BUILD on one of our own stand-ins (which would replace its attributes, or on a real tensor call
    torch.Tensor.__setstate__, i.e. set_ and hook assignment) is refused."""

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"data.pkl tries to set the state of a {type(self).__name__.strip('_')}")


class _TensorRecord(_Sealed):
    """A tensor rebuilt from the archive, held in a plain object rather than handed to pickle as a tensor."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _Storage(_Sealed):
    """One `data/<key>` entry as a flat tensor of its storage's dtype."""

    def __init__(self, flat: torch.Tensor, key: str):
        self.flat, self.key = flat, key


class _InertUnpickler(pickle._Unpickler):
    """Unpickles a torch.save `data.pkl` without importing or calling anything outside this module.

    Built on pickle's pure-Python unpickler: the C one keeps its memo in an array sized by the largest index a
    pickle names, so one crafted LONG_BINPUT can make it allocate tens of gigabytes; this one keeps a dict."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, _Storage] = {}
        self.named: set[str] = set()  # every global the pickle named, as `module.name`
        self.placeholders: dict[str, type] = {}

    def find_class(self, module, name):
        qualified = f"{module}.{name}"
        self.named.add(qualified)
        if qualified in STORAGE_DTYPES:
            return _StorageType(qualified)
        if qualified == "torch._utils._rebuild_tensor_v2":
            return self._rebuild_tensor_v2
        if qualified == "torch._utils._rebuild_parameter":
            return _rebuild_parameter
        if qualified == "collections.OrderedDict":
            return collections.OrderedDict
        if qualified in ("__builtin__.set", "builtins.set"):  # a module's _non_persistent_buffers_set
            return set
        if qualified in MODULE_CLASSES:
            if qualified not in self.placeholders:
                self.placeholders[qualified] = type(name, (ModulePlaceholder,), {"class_name": qualified})
            return self.placeholders[qualified]
        raise OriginalCheckpointError(
            f"{self.source}: refused: its pickle names the global {qualified}, which a DeepRAFT detector does not "
            f"need and which torch.load(weights_only=False) would import and possibly run; nothing was run")

    def persistent_load(self, pid):
        # torch.save's storage reference: ('storage', storage type, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise OriginalCheckpointError(f"{self.source}: data.pkl holds a persistent reference that is not a "
                                          f"torch storage: {str(pid)[:80]}")
        kind, key, numel = pid[1], pid[2], pid[4]
        if key in self.storages:
            return self.storages[key]
        entry = f"{self.prefix}data/{key}"
        try:
            size = _entry_size(self.archive, entry, self.source)
        except KeyError:
            raise OriginalCheckpointError(f"{self.source}: data.pkl refers to {entry}, which the archive lacks") \
                from None
        itemsize = torch.empty((), dtype=kind.dtype).element_size()
        if numel < 0 or size != numel * itemsize:
            raise OriginalCheckpointError(f"{self.source}: {entry} holds {size} bytes, not the {numel} × "
                                          f"{itemsize} its {kind.name} needs")
        raw = self.archive.read(entry)
        flat = torch.empty(numel, dtype=kind.dtype)
        flat.view(torch.uint8).numpy()[:] = np.frombuffer(raw, dtype=np.uint8)  # little-endian bytes, copied
        self.storages[key] = storage = _Storage(flat, key)
        return storage

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        """torch._utils._rebuild_tensor_v2's stand-in: a copy of the view (offset, size, stride) of a storage,
        after checking that it lies inside it and holds no more elements than it (no stride-0 blow-ups)."""
        if not (isinstance(storage, _Storage) and isinstance(offset, int) and isinstance(size, tuple)
                and isinstance(stride, tuple) and len(size) == len(stride)
                and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))):
            raise OriginalCheckpointError(f"{self.source}: data.pkl rebuilds a tensor from malformed arguments")
        numel, flat = 1, storage.flat
        for s in size:
            numel *= s
        last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if numel else offset - 1
        if numel > flat.numel() or last >= flat.numel():
            raise OriginalCheckpointError(f"{self.source}: a tensor of shape {tuple(size)} reaches past the end of "
                                          f"its storage data/{storage.key} ({flat.numel()} elements)")
        return _TensorRecord(flat.as_strided(size, stride, offset).clone())


class _StorageType(_Sealed):
    """Stand-in for a legacy storage class such as torch.FloatStorage: carries its dtype, does nothing."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]

    def __call__(self, *args, **kwargs):  # a pickle that calls it gets an error, not a storage
        raise pickle.UnpicklingError(f"{self.name} may only be named in a storage reference")


def _entry_size(archive: zipfile.ZipFile, entry: str, source: str) -> int:
    """Uncompressed size of a zip entry (KeyError when absent), refused above MAX_ENTRY_BYTES."""
    size = archive.getinfo(entry).file_size
    if size > MAX_ENTRY_BYTES:
        raise OriginalCheckpointError(f"{source}: {entry} claims {size} bytes, more than a detector needs "
                                      f"({MAX_ENTRY_BYTES >> 20} MiB at most)")
    return size


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    """torch._utils._rebuild_parameter's stand-in: the tensor itself (a Parameter's data is all we need)."""
    if not isinstance(data, _TensorRecord):
        raise pickle.UnpicklingError("_rebuild_parameter of something that is not a tensor")
    return data


# ------------------------------------------------------------------------------------------------ reading
def read_original(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an original detector.pth without running its pickle.

    Returns (state dict under the original's names, e.g. `model.0.conv.weight` (8,3,3,3) float32 on CPU,
    info: {"class": root module's `module.Class`, "globals": sorted `module.name` the pickle names,
    "modules": {module path: `module.Class`}, "settings": {module path: its non-tensor attributes}}).
    Raises FileNotFoundError or OriginalCheckpointError (a ValueError), one line naming the file.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such file" if not path.exists() else f"{source}: not a file")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise OriginalCheckpointError(
                    f"{source}: a zip archive, but not a torch.save file (it holds {len(pickles)} top-level "
                    f"*/data.pkl entries; torch.save writes one)")
            prefix = pickles[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in archive.namelist():
                order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
                if order != "little":
                    raise OriginalCheckpointError(f"{source}: saved with {order!r} byte order; only little-endian "
                                                  f"files are read")
            _entry_size(archive, pickles[0], source)
            data = archive.read(pickles[0])
            unpickler = _InertUnpickler(io.BytesIO(data), archive, prefix, source)
            try:
                # Parse every opcode first, running nothing: a length an opcode claims (BYTEARRAY8 allocates
                # its claim before reading) is then known to lie within the data.
                for _ in pickletools.genops(data):
                    pass
                root = unpickler.load()
            except OriginalCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 — untrusted bytes: any failure is "not readable"
                raise OriginalCheckpointError(f"{source}: {pickles[0]} is not a readable torch pickle "
                                              f"({_one_line(e)})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise OriginalCheckpointError(f"{source}: not a torch.save file (torch ≥ 1.6 writes a zip archive; this "
                                      f"is not a readable one: {_one_line(e)})") from None
    except OSError as e:
        raise OriginalCheckpointError(f"{source}: cannot be read ({_one_line(e)})") from None
    if not isinstance(root, ModulePlaceholder):
        raise OriginalCheckpointError(f"{source}: holds a {type(root).__name__}, not a pickled module (expected "
                                      f"a whole model.StampDetector)")
    state, info = {}, {"class": root.class_name, "globals": sorted(unpickler.named), "modules": {}, "settings": {}}
    try:
        _walk(root, "", state, info, source, set())
    except OriginalCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 — a crafted tree can hold anything; _walk checks what it relies on
        raise OriginalCheckpointError(f"{source}: its module tree is malformed ({_one_line(e)})") from None
    return state, info


def _walk(node: ModulePlaceholder, prefix: str, state: dict, info: dict, source: str, seen: set) -> None:
    """Collect a placeholder tree's parameters and persistent buffers under `prefix` (nn.Module.state_dict's
    names), and each module's class and plain settings."""
    if id(node) in seen or prefix.count(".") > MAX_DEPTH:
        raise OriginalCheckpointError(f"{source}: its module tree revisits a module, or nests deeper than "
                                      f"{MAX_DEPTH}, at {prefix.rstrip('.') or 'the root'}")
    seen.add(id(node))
    attrs = getattr(node, "state", None)
    if not isinstance(attrs, dict):
        raise OriginalCheckpointError(f"{source}: the {node.class_name} at {prefix.rstrip('.') or 'the root'} "
                                      f"carries no module state")
    where = prefix.rstrip(".")
    info["modules"][where] = node.class_name
    info["settings"][where] = {k: v for k, v in attrs.items() if isinstance(k, str) and not k.startswith("_")
                               and isinstance(v, (str, int, float, bool, tuple, type(None)))}
    skip = attrs.get("_non_persistent_buffers_set", set())
    if not isinstance(skip, set):
        raise OriginalCheckpointError(f"{source}: {where or 'the root'}._non_persistent_buffers_set is not a set")
    for group in ("_parameters", "_buffers"):
        tensors = attrs.get(group, {})
        if not isinstance(tensors, dict) or not all(isinstance(k, str) for k in tensors):
            raise OriginalCheckpointError(f"{source}: {where or 'the root'}.{group} is not a dict of names")
        for name, tensor in tensors.items():
            if tensor is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, _TensorRecord):
                raise OriginalCheckpointError(f"{source}: {prefix}{name} is a {type(tensor).__name__}, not a tensor")
            state[prefix + name] = tensor.tensor
    children = attrs.get("_modules", {})
    if not isinstance(children, dict) or not all(isinstance(k, str) for k in children):
        raise OriginalCheckpointError(f"{source}: {where or 'the root'}._modules is not a dict of names")
    for name, child in children.items():
        if child is None:
            continue
        if not isinstance(child, ModulePlaceholder):
            raise OriginalCheckpointError(f"{source}: {prefix}{name} is a {type(child).__name__}, not a module")
        _walk(child, f"{prefix}{name}.", state, info, source, seen)


def _check_settings(info: dict, source: str) -> None:
    """Refuse a detector whose layers are set up differently from the port (the tensors alone cannot tell)."""
    if info["class"] != "model.StampDetector":
        raise OriginalCheckpointError(f"{source}: holds a {info['class']}, not a model.StampDetector")
    settings = info["settings"]
    for where, expected in CONV_SETTINGS.items():
        got = settings.get(where)
        if got is None:
            continue  # a missing layer is reported with the tensor names
        have = tuple(got.get(k) for k in ("stride", "padding", "dilation", "groups", "padding_mode"))
        if have != expected:
            raise OriginalCheckpointError(f"{source}: {where} has (stride, padding, dilation, groups, padding_mode) "
                                          f"{have}, the port expects {expected}")
    for where, activation in ACTIVATIONS.items():
        if where in settings and settings[where].get("activation", activation) != activation:
            raise OriginalCheckpointError(f"{source}: {where} has activation {settings[where].get('activation')!r}, "
                                          f"the port expects {activation!r}")


def convert(path) -> tuple[Scanner, dict]:
    """detector.pth → (our deepraft Scanner holding its weights, clean = class 0, in eval mode; read_original's
    info). The state dict is loaded strictly: wrong names, shapes or non-finite values raise one line."""
    state, info = read_original(path)
    _check_settings(info, str(path))
    scanner = Scanner(SCANNER_CONFIG)
    load_state_checked(scanner, {KEY_PREFIX + k: v for k, v in state.items()}, str(path))
    # the original's class 1 is clean, class 0 stamped; ours is the other way round (CLEAN = 0): exchange fc2's
    # two output rows
    with torch.no_grad():
        fc2 = scanner.net.fc2.linear
        fc2.weight.copy_(fc2.weight.flip(0))
        fc2.bias.copy_(fc2.bias.flip(0))
    return scanner.eval(), info


def write_converted(path, out, force: bool = False, sigma: float | None = None) -> Path:
    """Convert `path` and write OUT/scanner.safetensors and OUT/config.json (models.io's layout, no encoder).
    `sigma`, for a detector trained with noise (the original's rs and rs_aug), is recorded as config.json's
    "sigma", so that scan.py and evaluate.py judge it smoothed at that σ, as they judge our rs models.

    Refuses (ValueError) when OUT already holds a model's files, unless `force`; then a stale encoder or
    calibration in OUT is removed, since it belonged to the model being replaced."""
    path, out = Path(path), Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    existing = [out / n for n in (SCANNER_NAME, CONFIG_NAME) if (out / n).exists()]
    if existing and not force:
        raise ValueError(f"{existing[0]}: already exists; pass --force to replace the model in {out}")
    scanner, info = convert(path)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (SCANNER_NAME + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in scanner.state_dict().items()}, str(tmp))
    digest = _sha256(tmp)
    os.replace(tmp, out / SCANNER_NAME)
    for stale in (ENCODER_NAME, CALIBRATION_NAME):
        if (out / stale).exists():
            (out / stale).unlink()
    config = {
        "scanner": asdict(scanner.config),
        "source": {
            "file": str(path), "sha256": _sha256(path), "class": info["class"],
            "code": "xinghua-qu/DeepRAFT (model.StampDetector)", "converted_by": "python -m models.convert_original",
            "label_order": "swapped: the original reads clean as class 1 and stamped as class 0; fc2's two rows "
                           "were exchanged so that class 0 = clean, class 1 = stamped",
            "output": "logits (the original returns their log_softmax: same argmax)",
            "input": "400x400 RGB in [0,1]; the original fits photos with ImageOps.fit(image, (400, 400))",
        },
        "sha256": {SCANNER_NAME: digest},
    }
    if sigma is not None:
        config["sigma"] = sigma
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.convert_original", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("detector", type=Path, metavar="PATH/detector.pth",
                   help="a detector.pth released with the original code (a whole pickled model.StampDetector); it "
                        "is read without running its pickle")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="model folder to write (scanner.safetensors, config.json); usable as scan.py --model DIR")
    p.add_argument("--force", action="store_true", help="replace the model already in DIR")
    p.add_argument("--sigma", type=_positive_float, default=None,
                   help="the noise σ the detector was trained with, recorded so that scan.py and evaluate.py judge "
                        "it smoothed: S for the original's rs/sigma_S; the original records none for rs_aug (its "
                        "README trains it with --std 0.5, the paper's Table 3 reports DA+RS at σ 0.25). Leave it "
                        "out for the baseline")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = write_converted(args.detector, args.out, force=args.force, sigma=args.sigma)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"converted {args.detector} → {out}/{SCANNER_NAME} + {CONFIG_NAME}: Scanner(arch='deepraft', "
          f"padding_mode='zeros'), label order swapped to clean = class 0; scan with: python scan.py --model {out} "
          f"PHOTOS (photos are fitted to 400×400)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
