"""Mixed-task ("EKS at serving time") graph `student_eks.onnx`: bank layout, graph surgery, bank rows, export-eks."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .package import PackageError, load_package, read_expert, sha256_file

EKS_FILE = "student_eks.onnx"
TASK_INPUT = "task_slot"
BANK_INPUT = "factor_bank"
HEAD_W_INPUT = "head_weight_bank"
HEAD_B_INPUT = "head_bias_bank"
ALIGN = 16  # floats (64 bytes): every segment starts on a cache line of the bank row


@dataclass(frozen=True)
class Options:
    """Graph variants (the benchmark compares them; the defaults are what export-eks writes)."""

    static_shapes: bool = True  # replace the exporter's Shape->Gather->Concat reshape targets by constants
    stem_merged: bool = True  # k > 1: one MatMul with W0 + dW_t on im2col patches instead of Conv + delta
    align: int = ALIGN
    # com.microsoft FusedConv(X, W, B, Z=delta, activation) instead of Conv + Add (+ Relu): "never", "always", or
    # "nchw": only for convs that onnxruntime's NCHWc layout would not take anyway (channels not a multiple of 4)
    fused: str = "nchw"
    bridge: str = ""  # "maxpool" | "dwconv": pass the delta through an NCHWc-capable identity op
    nhwc: bool = False  # side path on channels-last activations (activation = left MatMul operand)
    merge_min_hw: int = 0  # k = 1 layers with Ho*Wo >= this (0: none) run as per-sample MatMul with W0 + B_t A_t
    nhwc_after_conv: bool = False  # A-product on channels-last h where h comes from a (NCHWc) conv
    ew_max_hw: int = 0  # k = 1 layers with Ho*Wo <= this: side path as Mul + ReduceSum instead of tiny GEMMs
    interleave: bool = True  # channel shuffles as one interleaving Concat (no Transpose)
    segment_banks: bool = False  # benchmark only: one bank input per factor, one Gather per factor (naive)


VARIANTS = {
    # the brief's naive graph: one bank input per factor and per-layer Gathers, exporter's dynamic Shape ops,
    # stem as Conv(W0) + im2col delta, Conv + Add + Relu everywhere
    "naive": Options(static_shapes=False, stem_merged=False, interleave=False, fused="never", segment_banks=True),
    "row": Options(static_shapes=False, stem_merged=False, interleave=False, fused="never"),  # one Gather + Split
    "static": Options(stem_merged=False, interleave=False, fused="never"),  # + constant Reshape targets
    "stem": Options(interleave=False, fused="never"),  # + stem as one MatMul with W0 + dW_t on im2col patches
    "interleave": Options(fused="never"),  # + channel shuffle as one interleaving Concat
    "fused-all": Options(fused="always"),  # + FusedConv(Z = delta, Relu) for every k = 1 layer
    "bridge": Options(fused="never", bridge="dwconv"),  # delta made NCHWc by a 1x1 depthwise conv (worse)
    "nhwc": Options(fused="never", nhwc=True),  # side path channels-last (worse)
    "merge196": Options(fused="never", merge_min_hw=196),  # per-sample W0 + B A MatMul where HW >= 196 (no gain)
    "nhwc-free": Options(nhwc_after_conv=True),
    "ew1": Options(ew_max_hw=1),  # 1x1 maps (SE convs, Linear): Mul + ReduceSum instead of GEMMs (much worse)
    "final": Options(),  # what export-eks writes: FusedConv only where NCHWc would not apply anyway
}


# ---------------------------------------------------------------- bank layout


def bank_layout(manifest: dict, rank: int | None = None, align: int = ALIGN) -> dict:
    """Segments (A then B of every layer, in `manifest.layers` order) of one bank row at `rank`."""
    r = int(rank or manifest["lora"]["rank"])
    if r < int(manifest["lora"]["rank"]):
        raise ValueError("the bank rank must be >= the package rank")
    segments = []
    off = 0
    for L in manifest["layers"]:
        cout, cin, k, _ = L["shape"]
        for factor, rows, cols in (("A", r * k, cin * k), ("B", cout * k, r * k)):
            segments.append({"layer": L["name"], "factor": factor, "offset": off, "rows": rows, "cols": cols})
            off += rows * cols
            off = -(-off // align) * align
    return {"rank": r, "bank_width": off, "segments": segments}


def bank_row(expert: dict[str, np.ndarray], scale: float, layout: dict) -> np.ndarray:
    """One expert's bank row: its factors as stored (lower rank zero-padded), B multiplied by `scale`."""
    row = np.zeros(layout["bank_width"], dtype=np.float32)
    for s in layout["segments"]:
        m = np.asarray(expert[f"{s['layer']}.lora_{s['factor']}"], dtype=np.float32)
        seg = np.zeros((s["rows"], s["cols"]), dtype=np.float32)
        if s["factor"] == "A":
            if m.shape[1] != s["cols"] or m.shape[0] > s["rows"]:
                raise PackageError(f"{s['layer']}.lora_A: shape {m.shape} does not fit {s['rows']}x{s['cols']}")
            seg[: m.shape[0]] = m
        else:
            if m.shape[0] != s["rows"] or m.shape[1] > s["cols"]:
                raise PackageError(f"{s['layer']}.lora_B: shape {m.shape} does not fit {s['rows']}x{s['cols']}")
            seg[:, : m.shape[1]] = m * np.float32(scale)
        row[s["offset"]: s["offset"] + seg.size] = seg.reshape(-1)
    return row


def expert_bank_entry(path: Path, layout: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bank row, head weight, head bias) of one expert file, as the server fills a slot."""
    ex, meta = read_expert(path)
    r = int(meta["rank"])
    scale = float(meta.get("scale", float(meta["alpha"]) / r))
    return bank_row(ex, scale, layout), ex["head.weight"].astype(np.float32), ex["head.bias"].astype(np.float32)


def make_banks(entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]], classes: int | None = None):
    """Stack slot entries into (factor_bank, head_weight_bank, head_bias_bank), heads zero-padded to `classes`."""
    c = classes or max(e[1].shape[0] for e in entries)
    f = entries[0][1].shape[1]
    bank = np.stack([e[0] for e in entries]).astype(np.float32)
    hw = np.zeros((len(entries), c, f), dtype=np.float32)
    hb = np.zeros((len(entries), c), dtype=np.float32)
    for i, (_, w, b) in enumerate(entries):
        hw[i, : w.shape[0]] = w
        hb[i, : b.shape[0]] = b
    return bank, hw, hb


def eks_session_inputs(pkg: Path, manifest: dict, task_ids: list[str], rng: np.random.Generator | None = None,
                       extra_slots: int = 1) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Bank feeds holding the package's experts `task_ids` in (shuffled, when `rng`) slots plus `extra_slots`
    random rows that no sample uses; returns ({task: slot}, feeds without input and task_slot)."""
    eks = manifest["model"]["eks"]
    layout = {"rank": eks["rank"], "bank_width": eks["bank_width"], "segments": eks["segments"]}
    spec = {t["id"]: t for t in manifest["tasks"]}
    entries = [expert_bank_entry(Path(pkg) / spec[t]["file"], layout) for t in task_ids]
    if extra_slots:
        g = rng or np.random.default_rng(0)
        f = entries[0][1].shape[1]
        for _ in range(extra_slots):
            entries.append((g.standard_normal(layout["bank_width"]).astype(np.float32),
                            g.standard_normal((2, f)).astype(np.float32), g.standard_normal(2).astype(np.float32)))
    order = rng.permutation(len(entries)) if rng is not None else np.arange(len(entries))
    slots = [entries[i] for i in order]
    slot_of = {t: int(np.flatnonzero(order == i)[0]) for i, t in enumerate(task_ids)}
    bank, hw, hb = make_banks(slots)
    return slot_of, {eks["bank_input"]: bank, eks["head_weight_input"]: hw, eks["head_bias_input"]: hb}


# ---------------------------------------------------------------- graph surgery


class _Builder:
    def __init__(self, g: onnx.GraphProto):
        self.g = g
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"eks/{base}_{self.n}"

    def const(self, base: str, value: np.ndarray) -> str:
        nm = self.name(base)
        self.inits.append(numpy_helper.from_array(value, nm))
        return nm

    def i64(self, base: str, values) -> str:
        return self.const(base, np.asarray(values, dtype=np.int64))

    def op(self, op: str, inputs: list[str], base: str, n_out: int = 1, **attrs) -> list[str]:
        outs = [self.name(base) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs


def _value_shapes(model: onnx.ModelProto, input_name: str, size: tuple[int, int], batch: int) -> dict:
    """Run the model once in onnxruntime and return every intermediate value (shapes and small int tensors)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for o in node.output:
            if o and o not in known:
                m.graph.output.append(helper.make_empty_tensor_value_info(o))
                known.add(o)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in i.shape]
        if i.name == input_name:
            shape = [batch, 3, *size]
        feeds[i.name] = np.zeros(shape, dtype=np.float32)
    names = [o.name for o in sess.get_outputs()]
    return {**feeds, **dict(zip(names, sess.run(names, feeds), strict=True))}


def _staticise(g: onnx.GraphProto, v2: dict, v3: dict) -> None:
    """Reshape targets and other shape-derived int64 inputs that do not depend on the batch become constants
    (batch position of a Reshape target -> 0, i.e. copied from the input); dead nodes are removed after."""
    inits = {i.name for i in g.initializer}
    new_inits: dict[str, onnx.TensorProto] = {}
    for node in g.node:
        if node.op_type == "Reshape" and node.input[1] not in inits:
            src, out = node.input[0], node.output[0]
            if src not in v2 or out not in v2:
                continue
            s2, s3 = v2[out].shape, v3[out].shape
            i2, i3 = v2[src].shape, v3[src].shape
            target = []
            ok = len(s2) == len(s3)
            for d, (a, b) in enumerate(zip(s2, s3, strict=False)):
                if a == b:
                    target.append(a)
                elif d == 0 and a == i2[0] == 2 and b == i3[0] == 3:
                    target.append(0)
                else:
                    ok = False
            if ok:
                nm = f"{node.input[1]}__static"
                new_inits[nm] = numpy_helper.from_array(np.asarray(target, dtype=np.int64), nm)
                node.input[1] = nm
                keep = [a for a in node.attribute if a.name != "allowzero"]
                del node.attribute[:]
                node.attribute.extend(keep)
        elif node.op_type in ("Slice", "Split", "Unsqueeze", "Squeeze"):
            for j in range(1, len(node.input)):
                nm = node.input[j]
                if nm and nm not in inits and nm in v2 and v2[nm].dtype == np.int64 and np.array_equal(v2[nm], v3[nm]):
                    c = f"{nm}__static"
                    new_inits[c] = numpy_helper.from_array(v2[nm], c)
                    node.input[j] = c
    g.initializer.extend(new_inits.values())


def _interleave_shuffles(g: onnx.GraphProto, v2: dict) -> int:
    """Channel shuffle Concat(x_1..x_g, axis 1) -> Reshape [N, g, C/g, H, W] -> Transpose [0, 2, 1, 3, 4] ->
    Reshape [N, C, H, W] becomes one interleaving Concat(Unsqueeze(x_i, 2), axis 2) -> Reshape: the same values
    with one copy instead of two. Returns the number of shuffles rewritten."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    drop: set[int] = set()
    new: dict[int, list[onnx.NodeProto]] = {}
    axes = "eks/axes_2"
    count = 0
    for tr in g.node:
        if tr.op_type != "Transpose":
            continue
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        r1 = producer.get(tr.input[0])
        if perm != [0, 2, 1, 3, 4] or r1 is None or r1.op_type != "Reshape":
            continue
        cat = producer.get(r1.input[0])
        if cat is None or cat.op_type != "Concat" or tr.output[0] not in v2:
            continue
        if next((a.i for a in cat.attribute if a.name == "axis"), None) != 1:
            continue
        five = v2[r1.output[0]].shape  # [N, g, C/g, H, W]
        groups = len(cat.input)
        if len(five) != 5 or five[1] != groups or any(v2[x].shape[1] != five[2] for x in cat.input if x in v2):
            continue
        if any(len(consumers.get(t, [])) != 1 or t in outputs for t in (cat.output[0], r1.output[0], tr.output[0])):
            continue
        r2 = consumers[tr.output[0]][0]
        if r2.op_type != "Reshape":
            continue
        nodes = []
        ups = []
        for j, x in enumerate(cat.input):
            u = f"{cat.output[0]}/unsq{j}"
            nodes.append(helper.make_node("Unsqueeze", [x, axes], [u], name=f"{cat.name}/unsq{j}"))
            ups.append(u)
        inter = f"{cat.output[0]}/interleaved"
        nodes.append(helper.make_node("Concat", ups, [inter], name=f"{cat.name}/interleave", axis=2))
        r2.input[0] = inter
        new[id(cat)] = nodes
        drop.update({id(r1), id(tr)})
        count += 1
    if count:
        kept = []
        for node in g.node:
            if id(node) in new:
                kept.extend(new[id(node)])
            elif id(node) not in drop:
                kept.append(node)
        del g.node[:]
        g.node.extend(kept)
        g.initializer.append(numpy_helper.from_array(np.asarray([2], dtype=np.int64), axes))
    return count


def _prune(g: onnx.GraphProto) -> None:
    """Remove nodes and initializers that no graph output depends on."""
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


def build_eks_model(student: onnx.ModelProto, manifest: dict, layout: dict, opts: Options = Options()
                    ) -> onnx.ModelProto:
    """student.onnx -> student_eks.onnx (see FORMAT.md section 8)."""
    model = onnx.ModelProto()
    model.CopyFrom(student)
    g = model.graph
    mm = manifest["model"]
    in_name, hw_name, hb_name = mm["input_name"], mm["head_weight_input"], mm["head_bias_input"]
    size = (int(manifest["input"]["height"]), int(manifest["input"]["width"]))
    layers = {L["name"]: L for L in manifest["layers"]}
    inits = {i.name: i for i in g.initializer}
    missing = [n for n in layers if n not in inits]
    if missing:
        raise PackageError(f"student graph has no initializer for layers {missing[:3]}")

    v2 = _value_shapes(student, in_name, size, 2)
    v3 = _value_shapes(student, in_name, size, 3) if opts.static_shapes else None

    b = _Builder(g)
    slot = TASK_INPUT
    row = b.op("Gather", [BANK_INPUT, slot], "row", axis=0)[0]  # [N, width]
    # one Split of the whole row into the segments (and alignment gaps)
    seg_by = {(s["layer"], s["factor"]): s for s in layout["segments"]}
    pieces, sizes, pos = [], [], 0
    order = sorted(layout["segments"], key=lambda s: s["offset"])
    for s in order:
        if s["offset"] > pos:
            sizes.append(s["offset"] - pos)
            pieces.append(None)
        sizes.append(s["rows"] * s["cols"])
        pieces.append((s["layer"], s["factor"]))
        pos = s["offset"] + s["rows"] * s["cols"]
    if layout["bank_width"] > pos:
        sizes.append(layout["bank_width"] - pos)
        pieces.append(None)
    outs = b.op("Split", [row, b.i64("split", sizes)], "seg", n_out=len(sizes), axis=1)
    flat = {p: o for p, o in zip(pieces, outs, strict=True) if p is not None}
    new_nodes: list[onnx.NodeProto] = list(b.nodes)  # the bank's Gather + Split go first
    if opts.segment_banks:
        new_nodes = []

    def factor(layer: str, f: str) -> str:
        s = seg_by[(layer, f)]
        if opts.segment_banks:
            return b.op("Gather", [f"bank/{layer}/{f}", slot], f"{f}", axis=0)[0]
        return b.op("Reshape", [flat[(layer, f)], b.i64("shape", [0, s["rows"], s["cols"]])], f"{f}")[0]

    done = set()
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    graph_outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output}
    skip: set[str] = set()  # Relu nodes fused into a FusedConv
    for node in g.node:
        if node.name in skip and node.op_type == "Relu":
            continue
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in layers:
            name = node.input[1]
            L = layers[name]
            cout, cin, k, _ = L["shape"]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("group", 1) != 1:
                raise PackageError(f"{name}: grouped convs are not decomposed")
            h, y = node.input[0], node.output[0]
            hs, ys = v2[h].shape, v2[y].shape  # [2, Cin, H, W], [2, Cout, Ho, Wo]
            b.nodes = []
            a_t, b_t = factor(name, "A"), factor(name, "B")
            strides = attrs.get("strides", [1, 1])
            pads = attrs.get("pads", [0, 0, 0, 0])
            dil = attrs.get("dilations", [1, 1])
            hw = ys[2] * ys[3]
            if k == 1 and list(strides) == [1, 1] and not any(pads) and opts.merge_min_hw and hw >= opts.merge_min_hw:
                hf = b.op("Reshape", [h, b.i64("shape", [0, cin, hw])], "h")[0]
                dw = b.op("MatMul", [b_t, a_t], "dw")[0]  # [N, Cout, Cin]
                w0 = numpy_helper.to_array(inits[name]).reshape(cout, cin)
                wt = b.op("Add", [dw, b.const("w0", w0)], "wt")[0]
                o = b.op("MatMul", [wt, hf], "o")[0]
                o4 = b.op("Reshape", [o, b.i64("shape", [0, cout, ys[2], ys[3]])], "o4")[0]
                if len(node.input) > 2 and node.input[2]:
                    bv = numpy_helper.to_array(inits[node.input[2]]).reshape(1, cout, 1, 1)
                    b.op("Add", [o4, b.const("bias", bv)], "sum")
                else:
                    b.op("Identity", [o4], "sum")
                b.nodes[-1].output[0] = y
            elif k == 1 and list(strides) == [1, 1] and not any(pads):
                if opts.nhwc:
                    ht = b.op("Transpose", [h], "ht", perm=[0, 2, 3, 1])[0]
                    hf = b.op("Reshape", [ht, b.i64("shape", [0, hs[2] * hs[3], cin])], "hf")[0]
                    at = b.op("Transpose", [a_t], "at", perm=[0, 2, 1])[0]
                    z = b.op("MatMul", [hf, at], "z")[0]  # [N, HW, r]
                    bt = b.op("Transpose", [b_t], "bt", perm=[0, 2, 1])[0]
                    dt = b.op("MatMul", [z, bt], "dt")[0]  # [N, HW, Cout]
                    d3 = b.op("Reshape", [dt, b.i64("shape", [0, ys[2], ys[3], cout])], "d3")[0]
                    d4 = b.op("Transpose", [d3], "delta", perm=[0, 3, 1, 2])[0]
                elif (opts.nhwc_after_conv and h in producer and producer[h].op_type == "Conv"
                      and not (cin % 4 or cout % 4)):
                    ht = b.op("Transpose", [h], "ht", perm=[0, 2, 3, 1])[0]  # ORT: ReorderOutput(channels_last)
                    hf = b.op("Reshape", [ht, b.i64("shape", [0, hs[2] * hs[3], cin])], "hf")[0]
                    at = b.op("Transpose", [a_t], "at", perm=[0, 2, 1])[0]
                    zt = b.op("MatMul", [hf, at], "zt")[0]  # [N, HW, r]
                    z = b.op("Transpose", [zt], "z", perm=[0, 2, 1])[0]
                    d = b.op("MatMul", [b_t, z], "bz")[0]  # [N, Cout, HW]
                    d4 = b.op("Reshape", [d, b.i64("shape", [0, cout, ys[2], ys[3]])], "delta")[0]
                elif hw <= opts.ew_max_hw:  # tiny maps: broadcast Mul + ReduceSum over the whole batch at once
                    r = seg_by[(name, "A")]["rows"]
                    ax2 = b.i64("axes", [2])
                    h4 = b.op("Reshape", [h, b.i64("shape", [0, 1, cin, hw])], "h4")[0]
                    a4 = b.op("Reshape", [a_t, b.i64("shape", [0, r, cin, 1])], "a4")[0]
                    z = b.op("ReduceSum", [b.op("Mul", [a4, h4], "ah")[0], ax2], "z", keepdims=0)[0]  # [N, r, HW]
                    z4 = b.op("Reshape", [z, b.i64("shape", [0, 1, r, hw])], "z4")[0]
                    b4 = b.op("Reshape", [b_t, b.i64("shape", [0, cout, r, 1])], "b4")[0]
                    d = b.op("ReduceSum", [b.op("Mul", [b4, z4], "bz")[0], ax2], "d", keepdims=0)[0]
                    d4 = b.op("Reshape", [d, b.i64("shape", [0, cout, ys[2], ys[3]])], "delta")[0]
                else:
                    hf = b.op("Reshape", [h, b.i64("shape", [0, cin, hs[2] * hs[3]])], "h")[0]
                    ah = b.op("MatMul", [a_t, hf], "ah")[0]  # [N, r, HW]
                    d = b.op("MatMul", [b_t, ah], "bah")[0]  # [N, Cout, HW]
                    d4 = b.op("Reshape", [d, b.i64("shape", [0, cout, ys[2], ys[3]])], "delta")[0]
                if opts.bridge == "maxpool":
                    d4 = b.op("MaxPool", [d4], "bridge", kernel_shape=[1, 1])[0]
                elif opts.bridge == "dwconv":
                    d4 = b.op("Conv", [d4, b.const("ones", np.ones((cout, 1, 1, 1), np.float32))], "bridge",
                              group=cout, kernel_shape=[1, 1])[0]
                use_fused = opts.fused == "always" or (opts.fused == "nchw" and (cin % 4 or cout % 4))
                if use_fused:
                    cons = consumers.get(y, [])
                    act = {}
                    out = y
                    if len(cons) == 1 and cons[0].op_type == "Relu" and y not in graph_outputs:
                        act = {"activation": "Relu"}
                        out = cons[0].output[0]
                        skip.add(cons[0].name)
                    ins = list(node.input) + [""] * (3 - len(node.input))
                    b.nodes.append(helper.make_node("FusedConv", ins + [d4], [out], name=node.name,
                                                    domain="com.microsoft", **attrs, **act))
                else:
                    conv = helper.make_node("Conv", list(node.input), [b.name("conv0")], name=node.name,
                                            **attrs)
                    b.nodes.append(conv)
                    b.op("Add", [conv.output[0], d4], "sum")
                    b.nodes[-1].output[0] = y
            else:
                # im2col by a fixed one-hot conv: patch channel m = i*k*k + kh*k + kw (W0's flat order)
                kk = k * k
                eye = np.zeros((cin * kk, cin, k, k), dtype=np.float32)
                for i in range(cin):
                    for kh in range(k):
                        for kw in range(k):
                            eye[i * kk + kh * k + kw, i, kh, kw] = 1.0
                patches = b.op("Conv", [h, b.const("onehot", eye)], "patches", kernel_shape=[k, k],
                               strides=list(strides), pads=list(pads), dilations=list(dil))[0]
                lpos = ys[2] * ys[3]
                pf = b.op("Reshape", [patches, b.i64("shape", [0, cin * kk, lpos])], "pf")[0]
                dw = b.op("MatMul", [b_t, a_t], "dw")[0]  # [N, Cout*k, Cin*k]
                dwf = b.op("Reshape", [dw, b.i64("shape", [0, cout, cin * kk])], "dwf")[0]
                w0 = numpy_helper.to_array(inits[name]).reshape(cout, cin * kk)
                bias = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
                if opts.stem_merged:
                    wt = b.op("Add", [dwf, b.const("w0flat", w0)], "wt")[0]
                    o = b.op("MatMul", [wt, pf], "stem")[0]
                    o4 = b.op("Reshape", [o, b.i64("shape", [0, cout, ys[2], ys[3]])], "o4")[0]
                    if bias is not None:
                        bv = numpy_helper.to_array(bias).reshape(1, cout, 1, 1)
                        b.op("Add", [o4, b.const("bias", bv)], "sum")
                    else:
                        b.op("Identity", [o4], "sum")
                    b.nodes[-1].output[0] = y
                else:
                    d = b.op("MatMul", [dwf, pf], "d")[0]
                    d4 = b.op("Reshape", [d, b.i64("shape", [0, cout, ys[2], ys[3]])], "delta")[0]
                    conv = helper.make_node("Conv", list(node.input), [b.name("conv0")], name=node.name, **attrs)
                    b.nodes.append(conv)
                    b.op("Add", [conv.output[0], d4], "sum")
                    b.nodes[-1].output[0] = y
            new_nodes.extend(b.nodes)
            done.add(name)
        elif node.op_type in ("Mul", "Add") and any(i in layers for i in node.input):
            # a per-task BatchNorm's scale or shift ([1, C, 1, 1] layer): each sample's own W0 + scale * B_t A_t
            name = next(i for i in node.input if i in layers)
            if layers[name].get("role", "conv") == "conv":
                raise PackageError(f"{name}: a conv layer used by a {node.op_type} node")
            c = layers[name]["shape"][1]
            b.nodes = []
            a_t, b_t = factor(name, "A"), factor(name, "B")  # [N, r, C], [N, 1, r] (B already times scale)
            d = b.op("MatMul", [b_t, a_t], "d")[0]  # [N, 1, C]
            d4 = b.op("Reshape", [d, b.i64("shape", [0, c, 1, 1])], "d4")[0]
            w0 = numpy_helper.to_array(inits[name]).reshape(1, c, 1, 1)
            v = b.op("Add", [d4, b.const("w0", w0)], "affine")[0]
            ins = [v if i == name else i for i in node.input]
            b.nodes.append(helper.make_node(node.op_type, ins, list(node.output), name=node.name))
            new_nodes.extend(b.nodes)
            done.add(name)
        elif hw_name in node.input:
            if node.op_type != "Gemm":
                raise PackageError(f"the head is a {node.op_type} node, expected Gemm")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0 \
                    or attrs.get("beta", 1.0) != 1.0 or list(node.input[1:]) != [hw_name, hb_name]:
                raise PackageError("unexpected head Gemm")
            b.nodes = []
            feats = node.input[0]
            fdim = int(manifest["model"]["feature_dim"])
            w = b.op("Gather", [HEAD_W_INPUT, slot], "hw", axis=0)[0]  # [N, C, F]
            hbias = b.op("Gather", [HEAD_B_INPUT, slot], "hb", axis=0)[0]  # [N, C]
            f3 = b.op("Reshape", [feats, b.i64("shape", [0, fdim, 1])], "f3")[0]
            z = b.op("MatMul", [w, f3], "z")[0]  # [N, C, 1]
            z2 = b.op("Reshape", [z, b.i64("shape", [0, -1])], "z2")[0]
            b.op("Add", [z2, hbias], "logits")
            b.nodes[-1].output[0] = node.output[0]
            new_nodes.extend(b.nodes)
        else:
            new_nodes.append(node)
    if done != set(layers):
        raise PackageError(f"no Conv (or affine Mul/Add) node uses layers {sorted(set(layers) - done)[:3]}")
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(b.inits)

    if opts.static_shapes:
        _staticise(g, v2, v3)
    if opts.interleave:
        _prune(g)  # the exporter's Shape nodes would still count as consumers
        _interleave_shuffles(g, v2)

    # inputs: input, task_slot, banks; W0 and head are plain initializers / gone
    inp = next(i for i in g.input if i.name == in_name)
    fdim = int(mm["feature_dim"])
    del g.input[:]
    if opts.segment_banks:
        g.input.extend(helper.make_tensor_value_info(f"bank/{s['layer']}/{s['factor']}", TensorProto.FLOAT,
                                                     ["slots", s["rows"], s["cols"]]) for s in layout["segments"])
    g.input.extend([
        inp,
        helper.make_tensor_value_info(TASK_INPUT, TensorProto.INT64, ["batch"]),
        *([] if opts.segment_banks else
          [helper.make_tensor_value_info(BANK_INPUT, TensorProto.FLOAT, ["slots", layout["bank_width"]])]),
        helper.make_tensor_value_info(HEAD_W_INPUT, TensorProto.FLOAT, ["slots", "classes", fdim]),
        helper.make_tensor_value_info(HEAD_B_INPUT, TensorProto.FLOAT, ["slots", "classes"]),
    ])
    _prune(g)
    del g.value_info[:]
    model.doc_string = ("lorkd mixed-task EKS graph: per-sample expert factors gathered from factor_bank by "
                        "task_slot (FORMAT.md section 8)")
    if any(n.domain == "com.microsoft" for n in g.node):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(model, full_check=True)  # (contrib-domain nodes are not schema-checked)
    return model


# ---------------------------------------------------------------- package entry


def eks_manifest_entry(layout: dict) -> dict:
    return {
        "file": EKS_FILE, "input_name": "input", "task_input": TASK_INPUT, "bank_input": BANK_INPUT,
        "head_weight_input": HEAD_W_INPUT, "head_bias_input": HEAD_B_INPUT, "output_name": "logits",
        "rank": layout["rank"], "bank_width": layout["bank_width"], "segments": layout["segments"],
    }


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def export_eks(pkg: Path, rank: int | None = None, opts: Options = Options()) -> dict:
    """Add (or refresh) student_eks.onnx and manifest.model.eks in an existing package; idempotent.

    Returns the manifest's eks entry. The file is written first, the manifest last (atomically)."""
    pkg = Path(pkg)
    manifest = load_package(pkg)
    layout = bank_layout(manifest, rank, opts.align)
    student = onnx.load(str(pkg / manifest["model"]["file"]))
    model = build_eks_model(student, manifest, layout, opts)
    data = model.SerializeToString()
    _atomic_write(pkg / EKS_FILE, data)
    entry = eks_manifest_entry(layout)
    manifest["model"]["eks"] = entry
    manifest["files"][EKS_FILE] = hashlib.sha256(data).hexdigest()
    assert manifest["files"][EKS_FILE] == sha256_file(pkg / EKS_FILE)
    _atomic_write(pkg / "manifest.json", json.dumps(manifest, indent=1).encode())
    return entry
