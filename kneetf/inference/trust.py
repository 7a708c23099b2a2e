"""A model file is code: what a SavedModel or a TFLite file would run, checked before it runs.

A SavedModel is a TensorFlow program. Its functions may read and write files (ReadFile,
WriteFile, MatchingFiles, SaveV2 / RestoreV2 with a path of their own), call back into Python
(PyFunc), parse arbitrary protos, print to files, and `tf.saved_model.load` already runs
some of them (resource initialisers) before any signature is called. `.keras` files load
with `safe_mode=True` (no Python lambdas); SavedModel and TFLite files have no such mode.

`check_savedmodel` reads `saved_model.pb` without loading it and refuses any operation that
is not on `ALLOWED_OPS`, the tensor arithmetic, variables and function calls of the graphs
`kneetf export` writes (tests/test_trust.py checks that every export passes), in the
signatures, in every function they call (nested functions, control flow branches,
gradients) and in every function of the object graph. The one exception is the saver that
every SavedModel carries (`saver_def`): its own functions may save and restore the
variables (`SAVER_OPS`), as long as nothing else calls them.

`check_tflite` refuses custom operators, among them the Flex (TensorFlow) ops that a TFLite
file may embed; builtin TFLite operators do no I/O.

These checks make a stranger's model file refused instead of run; they are not a sandbox.
Load files you do not trust only with `trust_model=True` (`--trust-model`) after reading
them, or not at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from kneetf.errors import UnsafeModelError

#: Operations of the SavedModels `kneetf export` writes, and pure tensor arithmetic of the
#: same kind: no file, network, Python or process access.
ALLOWED_OPS = frozenset("""
    Const Identity IdentityN NoOp Placeholder PlaceholderWithDefault StopGradient PreventGradient
    Snapshot EnsureShape CheckNumerics CheckNumericsV2 Assert
    StatefulPartitionedCall PartitionedCall If StatelessIf While StatelessWhile Case StatelessCase
    VarHandleOp ReadVariableOp AssignVariableOp AssignAddVariableOp AssignSubVariableOp VarIsInitializedOp
    DisableCopyOnRead
    Add AddV2 AddN Sub Mul MulNoNan Div RealDiv DivNoNan FloorDiv FloorMod TruncateDiv Mod Neg Abs Sign
    Square SquaredDifference Sqrt Rsqrt Reciprocal Inv Exp Expm1 Log Log1p Pow Maximum Minimum Floor Ceil
    Round Rint Erf Tanh Sigmoid Relu Relu6 Elu Selu LeakyRelu Softplus Softsign Softmax LogSoftmax ClipByValue
    Sum Mean Max Min Prod ArgMax ArgMin Cumsum All Any
    MatMul BatchMatMul BatchMatMulV2 BatchMatMulV3 Einsum
    Conv2D Conv3D DepthwiseConv2dNative Conv2DBackpropInput Conv2DBackpropFilter Conv3DBackpropInputV2
    Conv3DBackpropFilterV2 DepthwiseConv2dNativeBackpropInput DepthwiseConv2dNativeBackpropFilter BiasAdd
    BiasAddGrad FusedBatchNorm FusedBatchNormV2 FusedBatchNormV3 FusedBatchNormGrad FusedBatchNormGradV3
    MaxPool MaxPoolV2 AvgPool MaxPool3D AvgPool3D MaxPoolGrad AvgPoolGrad
    ResizeArea ResizeBilinear ResizeNearestNeighbor ResizeBicubic ScaleAndTranslate
    ReluGrad Relu6Grad EluGrad SeluGrad LeakyReluGrad SigmoidGrad TanhGrad RsqrtGrad SqrtGrad
    ReciprocalGrad SoftplusGrad BroadcastGradientArgs
    Shape ShapeN Size Rank Reshape Squeeze ExpandDims Transpose ConjugateTranspose Concat ConcatV2 ConcatOffset
    Pack Unpack Split SplitV Slice StridedSlice StridedSliceGrad Gather GatherV2 GatherNd ScatterNd
    TensorScatterUpdate Tile Pad PadV2 MirrorPad Fill ZerosLike OnesLike Range Cast Select SelectV2 Where
    Greater GreaterEqual Less LessEqual Equal NotEqual LogicalAnd LogicalOr LogicalNot IsFinite IsNan IsInf
    TopKV2 Reverse ReverseV2 BroadcastTo BroadcastArgs DepthToSpace SpaceToDepth OneHot InvertPermutation
    MatrixBandPart MatrixDiag MatrixDiagV3 MatrixDiagPartV3 MatrixSetDiagV3 Cholesky MatrixTriangularSolve
    MatrixSolve MatrixInverse
""".split())

#: What the saver of a SavedModel runs to save and restore its variables; allowed only in
#: the functions and nodes that `saver_def` alone reaches.
SAVER_OPS = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename", "StringJoin",
                       "StaticRegexFullMatch"})

TRUST_HINT = ("a model file is code: load it only if you trust where it came from (--trust-model, "
              "trust_model=True)")


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _func_refs(node: Any) -> list[str]:
    """Names of the functions a NodeDef calls through its attributes (f, then/else
    branches, loop bodies, gradients)."""
    names = []
    for value in node.attr.values():
        kind = value.WhichOneof("value")
        if kind == "func":
            names.append(value.func.name)
        elif kind == "list":
            names += [f.name for f in value.list.func]
    return names


def _closure(roots: Iterable[str], calls: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += calls.get(name, ())
    return seen


def _backward(roots: Iterable[str], inputs: dict[str, list[str]]) -> set[str]:
    """Main-graph nodes that `roots` depend on (data and control inputs)."""
    return _closure((_node_name(r) for r in roots), {n: {_node_name(i) for i in ins} for n, ins in inputs.items()})


def unsafe_savedmodel_ops(path: str | Path) -> dict[str, set[str]]:
    """Operation -> where it occurs (function or node names), for every operation of the
    SavedModel folder `path` that `check_savedmodel` refuses; {} when there is none."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = Path(path)
    pb = path / "saved_model.pb"
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(pb.read_bytes())
    except Exception as e:  # OSError, protobuf DecodeError
        raise UnsafeModelError(pb, f"cannot read the SavedModel graph: {e}") from e
    bad: dict[str, set[str]] = {}
    for meta in saved.meta_graphs:
        graph = meta.graph_def
        library = {f.signature.name: f for f in graph.library.function}
        nodes = {n.name: n for n in graph.node}
        inputs = {n.name: list(n.input) for n in graph.node}
        saver = meta.saver_def
        saver_nodes = _backward([t for t in (saver.save_tensor_name, saver.restore_op_name,
                                             saver.filename_tensor_name) if t], inputs)
        roots = [t.name for sig in meta.signature_def.values() for t in (*sig.inputs.values(), *sig.outputs.values())]
        roots += [v for col in meta.collection_def.values() for v in col.node_list.value]
        strict_nodes = (set(nodes) - saver_nodes) | _backward(roots, inputs)

        calls = {name: {ref for n in f.node_def for ref in _func_refs(n)} for name, f in library.items()}
        for grad in graph.library.gradient:
            calls.setdefault(grad.function_name, set()).add(grad.gradient_func)
        saver_roots = {ref for name in saver_nodes - strict_nodes for ref in _func_refs(nodes[name])}
        other_roots = (set(library) - saver_roots) | {ref for name in strict_nodes for ref in _func_refs(nodes[name])}
        other_roots |= set(meta.object_graph_def.concrete_functions)
        strict_fns = _closure(other_roots, calls)
        saver_fns = _closure(saver_roots, calls) - strict_fns

        def flag(op: str, where: str, saver_scope: bool) -> None:
            if op not in ALLOWED_OPS and not (saver_scope and op in SAVER_OPS):
                bad.setdefault(op, set()).add(where)

        for name, node in nodes.items():
            flag(node.op, name, name not in strict_nodes)
        for name in strict_fns | saver_fns:
            if name not in library:  # a function attribute naming an operation
                flag(name, "a function attribute", False)
                continue
            for node in library[name].node_def:
                flag(node.op, name, name in saver_fns)
    return bad


def check_savedmodel(path: str | Path) -> None:
    """Refuse (UnsafeModelError) a SavedModel that runs operations outside `ALLOWED_OPS`
    (file, Python or other I/O), before anything of it is loaded or run."""
    bad = unsafe_savedmodel_ops(path)
    if bad:
        listed = "; ".join(f"{op} (in {', '.join(sorted(where)[:3])})" for op, where in sorted(bad.items()))
        raise UnsafeModelError(path, f"the SavedModel runs operations kneetf models never use: {listed}. "
                                     f"Refused: {TRUST_HINT}")


def custom_tflite_ops(path: str | Path) -> list[str]:
    """The custom operators (Flex TensorFlow ops among them) a `.tflite` file needs."""
    from ai_edge_litert import schema_py_generated as schema

    path = Path(path)
    try:
        buffer = path.read_bytes()
        if not schema.Model.ModelBufferHasIdentifier(buffer, 0):
            raise ValueError("not a TFLite flatbuffer (no TFL3 identifier)")
        model = schema.Model.GetRootAs(buffer, 0)
        codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    except Exception as e:  # OSError, a malformed flatbuffer
        raise UnsafeModelError(path, f"cannot read the TFLite model's operators: {e}") from e
    custom = []
    for code in codes:
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin in (schema.BuiltinOperator.CUSTOM, schema.BuiltinOperator.DELEGATE):
            name = code.CustomCode()
            custom.append(name.decode("utf-8", "replace") if name else f"builtin {builtin}")
    return custom


def check_tflite(path: str | Path) -> None:
    """Refuse (UnsafeModelError) a `.tflite` file with custom or Flex operators."""
    custom = custom_tflite_ops(path)
    if custom:
        raise UnsafeModelError(path, f"the TFLite model needs custom operators ({', '.join(sorted(set(custom)))}); "
                                     f"kneetf models use builtin ones only. Refused: {TRUST_HINT}")


__all__ = ["ALLOWED_OPS", "SAVER_OPS", "unsafe_savedmodel_ops", "check_savedmodel", "custom_tflite_ops",
           "check_tflite"]
