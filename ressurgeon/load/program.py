"""The walk over one archive's program JSON: graphs, nodes, arguments, signatures, metadata, tensors.

Every field is checked against the allowlist (``allowlist.py``); see ``validate.py``.
"""

from __future__ import annotations

import json
import re

from .._names import is_identifier, shown
from .allowlist import (
    ELEMENT_SIZE, EXPANSION_CAP, EXPANSION_FACTOR, LAYOUTS, MAX_DEPTH, MAX_DIM,
    MAX_ELEMENTS, STRIDED, _ARGUMENT_KINDS, _JsonChecker, _bounded_json, _split_stack_item,
    made_up_bytes)
from .expressions import expression_problem, guard_problem


class _Checker(_JsonChecker):
    """Walks one archive's JSON; ``field`` arguments are readable paths for the message."""

    def program(self, member: str, data) -> None:
        self.member = member
        self.obj(data, "program", frozenset({
            "graph_module", "opset_version", "range_constraints", "schema_version", "verifiers",
            "torch_version", "guards_code"}), frozenset({"graph_module"}))
        for ns, version in self.dict_(data.get("opset_version", {}), "opset_version").items():
            self.identifier(ns, "opset_version namespace")
            self.integer(version, f"opset_version[{ns}]")
        for symbol, bounds in self.dict_(data.get("range_constraints", {}),
                                         "range_constraints").items():
            where = f"range_constraints[{shown(symbol)}]"
            self.expression(symbol, where)
            self.obj(bounds, where, frozenset({"min_val", "max_val"}))
            low, high = bounds.get("min_val"), bounds.get("max_val")
            for value in (low, high):
                if value is not None:
                    self.integer(value, where)
            if is_identifier(symbol):
                self.ranges[symbol] = (low, high)
        if "schema_version" in data:
            version = self.obj(data["schema_version"], "schema_version",
                               frozenset({"major", "minor"}))
            for key, value in version.items():
                self.integer(value, f"schema_version.{key}", 0, 1 << 20)
        for i, name in enumerate(self.list_(data.get("verifiers", []), "verifiers")):
            self.identifier(name, f"verifiers[{i}]")
        self.string(data.get("torch_version", ""), "torch_version", 200)
        guards = self.list_(data.get("guards_code", []), "guards_code")
        for i, line in enumerate(guards):
            problem = guard_problem(line)
            if problem:  # never run for an untrusted file, and it must still look like a guard
                raise self.fail(f"guards_code[{i}]", line, f"a guard on input sizes ({problem})")
        self.guards += len(guards)
        self.graph_module(data["graph_module"])

    def graph_module(self, gm) -> None:
        self.obj(gm, "graph_module", frozenset({
            "graph", "signature", "module_call_graph", "metadata", "treespec_namedtuple_fields"}),
            frozenset({"graph", "signature"}))
        self.graph(gm["graph"], "graph", 0)
        self.signature(gm["signature"])
        for i, entry in enumerate(self.list_(gm.get("module_call_graph", []),
                                             "module_call_graph")):
            where = f"module_call_graph[{i}]"
            self.obj(entry, where, frozenset({"fqn", "signature"}), frozenset({"fqn"}))
            self.fqn(entry["fqn"], f"{where}.fqn", allow_empty=True, call_index=True)
            if entry.get("signature") is not None:
                self.call_signature(entry["signature"], f"{where}.signature")
        for key, value in self.dict_(gm.get("metadata", {}), "graph_module.metadata").items():
            self.string(key, "graph_module.metadata key", 200)
            self.string(value, f"graph_module.metadata[{shown(key)}]")
        for name, fields in self.dict_(gm.get("treespec_namedtuple_fields", {}),
                                       "treespec_namedtuple_fields").items():
            where = f"treespec_namedtuple_fields[{shown(name)}]"
            self.class_name(name, where)
            self.obj(fields, where, frozenset({"field_names"}), frozenset({"field_names"}))
            for j, f in enumerate(self.list_(fields["field_names"], where)):
                self.identifier(f, f"{where}.field_names[{j}]")

    def call_signature(self, sig, where: str) -> None:
        self.obj(sig, where, frozenset({"inputs", "outputs", "in_spec", "out_spec",
                                        "forward_arg_names"}))
        for key in ("inputs", "outputs"):
            for j, arg in enumerate(self.list_(sig.get(key, []), f"{where}.{key}")):
                self.argument(arg, f"{where}.{key}[{j}]", 0)
        for key in ("in_spec", "out_spec"):
            if key in sig:
                self.treespec(self.string(sig[key], f"{where}.{key}"), f"{where}.{key}")
        for j, name in enumerate(self.list_(sig.get("forward_arg_names") or [],
                                            f"{where}.forward_arg_names")):
            self.identifier(name, f"{where}.forward_arg_names[{j}]")

    def treespec(self, text: str, where: str) -> None:
        """A pytree spec, stored as JSON text: type names are classes, contexts hold names."""
        try:
            spec = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise self.fail(where, text, "a pytree spec (JSON)") from exc
        if not (isinstance(spec, list) and len(spec) == 2 and type(spec[0]) is int):
            raise self.fail(where, text, "a pytree spec [version, tree]")
        todo = [(spec[1], 0)]
        count = 0
        while todo:
            node, depth = todo.pop()
            count += 1
            if depth > MAX_DEPTH or count > 1_000_000:
                raise self.fail(where, text, f"a pytree spec at most {MAX_DEPTH} deep")
            self.obj(node, where, frozenset({"type", "context", "children_spec"}))
            if node.get("type") is not None:
                self.class_name(node["type"], f"{where} type")
            if node.get("context") is not None:
                self.context(self.string(node["context"], f"{where} context"), where)
            todo += [(child, depth + 1) for child in self.list_(node.get("children_spec", []),
                                                                 where)]

    def context(self, text: str, where: str) -> None:
        """A pytree node's context: dict keys (written into the generated forward's source),
        a namedtuple's class, or an enum as module:qualname and member name."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise self.fail(f"{where} context", text, "JSON") from exc
        todo = [(value, 0)]
        while todo:
            item, depth = todo.pop()
            if depth > MAX_DEPTH:
                raise self.fail(f"{where} context", text, f"at most {MAX_DEPTH} deep")
            if isinstance(item, dict) and "__enum__" in item:
                self.obj(item, f"{where} enum", frozenset({"__enum__", "fqn", "name"}))
                module, sep, qualname = str(item.get("fqn", "")).partition(":")
                if not sep:
                    raise self.fail(f"{where} enum fqn", item.get("fqn"), "module:qualname")
                self.class_name(module, f"{where} enum module")
                self.class_name(qualname, f"{where} enum class")
                self.identifier(item.get("name"), f"{where} enum member")
            elif isinstance(item, dict):
                for k, v in item.items():
                    self.class_name(k, f"{where} context key")
                    todo.append((v, depth + 1))
            elif isinstance(item, list):
                todo += [(v, depth + 1) for v in item]
            elif isinstance(item, str):
                self.class_name(item, f"{where} context key")
            elif item is not None and type(item) not in (int, float, bool):
                raise self.fail(f"{where} context", item, "names and numbers")

    def signature(self, sig) -> None:
        self.obj(sig, "signature", frozenset({"input_specs", "output_specs"}))
        inputs = {
            "user_input": ("arg", None), "parameter": ("arg", "parameter_name"),
            "buffer": ("arg", "buffer_name"), "tensor_constant": ("arg", "tensor_constant_name"),
            "token": ("arg", None), "constant_input": (None, "name"),
        }
        for i, spec in enumerate(self.list_(sig.get("input_specs", []), "input_specs")):
            where = f"input_specs[{i}]"
            kind, inner = self.union(spec, where, frozenset(inputs))
            self.dict_(inner, f"{where}.{kind}")
            arg_key, name_key = inputs[kind]
            if arg_key:
                self.any_argument(inner.get(arg_key), f"{where}.{kind}.arg")
            if name_key:
                self.fqn(inner.get(name_key), f"{where}.{kind}.{name_key}")
            if kind == "constant_input":
                self.union(inner.get("value"), f"{where}.value",
                           frozenset({"as_none", "as_int", "as_float", "as_bool"}))
            if kind == "buffer" and "persistent" in inner:
                self.boolean(inner["persistent"], f"{where}.buffer.persistent")
        outputs = {
            "user_output": None, "loss_output": None, "buffer_mutation": "buffer_name",
            "gradient_to_parameter": "parameter_name",
            "gradient_to_user_input": "user_input_name",
            "user_input_mutation": "user_input_name", "token": None,
            "parameter_mutation": "parameter_name",
        }
        for i, spec in enumerate(self.list_(sig.get("output_specs", []), "output_specs")):
            where = f"output_specs[{i}]"
            kind, inner = self.union(spec, where, frozenset(outputs))
            self.dict_(inner, f"{where}.{kind}")
            self.any_argument(inner.get("arg"), f"{where}.{kind}.arg")
            if outputs[kind]:
                self.fqn(inner.get(outputs[kind]), f"{where}.{kind}.{outputs[kind]}")

    def any_argument(self, arg, where: str) -> None:
        """An Argument, or a bare TensorArgument/TokenArgument ({"name": ...})."""
        if isinstance(arg, dict) and set(arg) == {"name"}:
            self.identifier(arg["name"], f"{where}.name")
        else:
            self.argument(arg, where, 0)

    # graphs, nodes, arguments

    def graph(self, graph, where: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(where, "...", f"a graph nested at most {MAX_DEPTH} deep")
        self.obj(graph, where, frozenset({
            "inputs", "outputs", "nodes", "tensor_values", "sym_int_values", "sym_bool_values",
            "is_single_tensor_return", "custom_obj_values", "sym_float_values"}),
            frozenset({"inputs", "outputs", "nodes"}))
        for key in ("inputs", "outputs"):
            for i, arg in enumerate(self.list_(graph[key], f"{where}.{key}")):
                self.argument(arg, f"{where}.{key}[{i}]", depth)
        for i, node in enumerate(self.list_(graph["nodes"], f"{where}.nodes")):
            self.node(node, f"{where}.nodes[{i}]", depth)
        for name, meta in self.dict_(graph.get("tensor_values", {}),
                                     f"{where}.tensor_values").items():
            self.identifier(name, f"{where}.tensor_values name")
            self.tensor_meta(meta, f"{where}.tensor_values[{name}]")
        for key, kinds in (("sym_int_values", "as_int"), ("sym_bool_values", "as_bool"),
                           ("sym_float_values", "as_float")):
            for name, value in self.dict_(graph.get(key, {}), f"{where}.{key}").items():
                self.identifier(name, f"{where}.{key} name")
                self.sym_value(value, f"{where}.{key}[{name}]", kinds)
        if graph.get("custom_obj_values"):
            name = next(iter(graph["custom_obj_values"]))
            raise self.fail(f"{where}.custom_obj_values", name,
                            "empty (a TorchBind object loads by unpickling)")

    def node(self, node, where: str, depth: int) -> None:
        self.obj(node, where, frozenset({"target", "inputs", "outputs", "metadata",
                                         "is_hop_single_tensor_return", "name"}),
                 frozenset({"target", "inputs", "outputs"}))
        self.target(node["target"], f"{where}.target")
        if node.get("name") is not None:
            self.identifier(node["name"], f"{where}.name")
        for i, named in enumerate(self.list_(node["inputs"], f"{where}.inputs")):
            at = f"{where}.inputs[{i}]"
            self.obj(named, at, frozenset({"name", "arg", "kind"}), frozenset({"name", "arg"}))
            self.identifier(named["name"], f"{at}.name")
            self.argument(named["arg"], f"{at}.arg", depth)
            if named.get("kind") is not None:
                self.integer(named["kind"], f"{at}.kind", 0, 16)
        for i, arg in enumerate(self.list_(node["outputs"], f"{where}.outputs")):
            self.argument(arg, f"{where}.outputs[{i}]", depth)
        for key, value in self.dict_(node.get("metadata", {}), f"{where}.metadata").items():
            self.metadata(key, value, f"{where}.metadata")

    def metadata(self, key, value, where: str) -> None:
        self.string(key, f"{where} key", 200)
        text = self.string(value, f"{where}[{key}]")
        if key == "stack_trace":
            # only ever a comment in generated code, where a carriage return would end it
            if "\r" in text or "\x00" in text:
                raise self.fail(f"{where}.stack_trace", text, "text without carriage returns")
        elif key == "nn_module_stack":
            self.module_stack(text, f"{where}.nn_module_stack")
        elif key == "source_fn_stack":
            for item in text.split(";"):
                name, sep, fn = item.partition(",")
                if not sep:
                    raise self.fail(f"{where}.source_fn_stack", item, "name,function")
                self.identifier(name, f"{where}.source_fn_stack name")
                self.class_name(fn, f"{where}.source_fn_stack function")
        elif key in ("custom", "from_node"):
            try:
                _bounded_json(text)
            except (ValueError, RecursionError) as exc:
                raise self.fail(f"{where}.{key}", text, f"JSON at most {MAX_DEPTH} deep") from exc

    def module_stack(self, text: str, where: str) -> None:
        """``key,path,class;...``: paths become submodule names, classes are names too."""
        for item in text.split(";"):
            parts = _split_stack_item(item)
            if parts is None:
                raise self.fail(where, item, "key,path,class")
            key, path, cls = parts
            if any(c in key for c in "\\\n\r\"") or len(key) > 2000:
                raise self.fail(f"{where} key", key, "a module key without quotes or escapes")
            self.fqn(path, f"{where} path", allow_empty=True, call_index=True)
            if not (cls == path == key or cls == ""):  # torch's placeholder for "no module"
                self.class_name(cls, f"{where} class")

    def argument(self, arg, where: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(where, "...", f"arguments nested at most {MAX_DEPTH} deep")
        kind, value = self.union(arg, where, _ARGUMENT_KINDS)
        where = f"{where}.{kind}"
        if kind in ("as_none", "as_bool"):
            if kind == "as_bool":
                self.boolean(value, where)
        elif kind in ("as_int", "as_scalar_type", "as_memory_format", "as_layout"):
            self.integer(value, where)
        elif kind == "as_float":
            self.number(value, where)
        elif kind in ("as_ints", "as_floats", "as_bools", "as_int_lists", "as_float_lists"):
            for item in self.list_(value, where):
                for x in (self.list_(item, where) if kind.endswith("_lists") else [item]):
                    if kind == "as_bools":
                        self.boolean(x, where)
                    else:
                        self.number(x, where)
        elif kind in ("as_string", "as_strings"):
            for item in (self.list_(value, where) if kind == "as_strings" else [value]):
                self.literal(item, where)
        elif kind in ("as_tensor", "as_graph"):
            self.obj(value, where, frozenset({"name", "graph"} if kind == "as_graph"
                                             else {"name"}), frozenset({"name"}))
            self.identifier(value["name"], f"{where}.name")
            if kind == "as_graph":
                self.graph(value.get("graph"), f"{where}.graph", depth + 1)
        elif kind in ("as_tensors", "as_nested_tensors"):
            for item in self.list_(value, where):
                for t in (self.list_(item, where) if kind == "as_nested_tensors" else [item]):
                    self.obj(t, where, frozenset({"name"}), frozenset({"name"}))
                    self.identifier(t["name"], f"{where}.name")
        elif kind in ("as_optional_tensor", "as_optional_tensors"):
            for item in (self.list_(value, where) if kind.endswith("s") else [value]):
                inner_kind, inner = self.union(item, where, frozenset({"as_tensor", "as_none"}))
                if inner_kind == "as_tensor":
                    self.obj(inner, where, frozenset({"name"}), frozenset({"name"}))
                    self.identifier(inner["name"], f"{where}.name")
        elif kind in ("as_sym_int", "as_sym_bool", "as_sym_float", "as_sym_ints",
                      "as_sym_bools", "as_sym_floats"):
            concrete = {"int": "as_int", "boo": "as_bool", "flo": "as_float"}[kind[7:10]]
            for item in (self.list_(value, where) if kind.endswith("s") else [value]):
                inner_kind, inner = self.union(item, where, frozenset({"as_name", concrete}))
                if inner_kind == "as_name":
                    self.identifier(inner, f"{where}.as_name")
                elif concrete == "as_bool":
                    self.boolean(inner, where)
                else:
                    self.number(inner, where)
        elif kind == "as_device":
            self.device(value, where)
        elif kind == "as_complex":
            self.obj(value, where, frozenset({"real", "imag"}))
            for x in value.values():
                self.number(x, where)
        elif kind == "as_operator":
            self.target(value, where)
        elif kind == "as_string_to_argument":
            for key, inner in self.dict_(value, where).items():
                self.string(key, f"{where} key", 1000)
                self.argument(inner, f"{where}[{shown(key)}]", depth + 1)
        elif kind == "as_custom_obj":
            raise self.fail(where, value, "a tensor or a plain value (a TorchBind object loads "
                            "by unpickling)")

    def device(self, value, where: str) -> None:
        self.obj(value, where, frozenset({"type", "index"}), frozenset({"type"}))
        if not (isinstance(value["type"], str) and re.fullmatch(r"[a-z_]{1,20}", value["type"])):
            raise self.fail(f"{where}.type", value["type"], "a device type such as cpu or cuda")
        self.names.add(value["type"])
        if value.get("index") is not None:
            self.integer(value["index"], f"{where}.index", 0, 1 << 16)

    # tensors and shapes

    def tensor_meta(self, meta, where: str) -> tuple[list, list, object]:
        self.obj(meta, where, frozenset({"dtype", "sizes", "requires_grad", "device", "strides",
                                         "storage_offset", "layout"}),
                 frozenset({"dtype", "sizes", "strides", "storage_offset"}))
        if meta["dtype"] not in ELEMENT_SIZE and meta["dtype"] != 0:
            raise self.fail(f"{where}.dtype", meta["dtype"], "a dtype torch.export writes")
        if meta.get("layout", STRIDED) not in LAYOUTS:
            raise self.fail(f"{where}.layout", meta.get("layout"), "a layout torch.export writes")
        if "requires_grad" in meta:
            self.boolean(meta["requires_grad"], f"{where}.requires_grad")
        if "device" in meta:
            self.device(meta["device"], f"{where}.device")
        sizes = [self.sym_int(s, f"{where}.sizes") for s in self.list_(meta["sizes"], where)]
        strides = [self.sym_int(s, f"{where}.strides") for s in self.list_(meta["strides"], where)]
        offset = self.sym_int(meta["storage_offset"], f"{where}.storage_offset")
        if len(sizes) != len(strides) or len(sizes) > 64:
            raise self.fail(f"{where}.strides", len(strides), f"{len(sizes)} strides (one a dim)")
        numel = 1
        for size in sizes:
            numel *= size if isinstance(size, int) else 1
            if numel > MAX_ELEMENTS:
                raise self.fail(f"{where}.sizes", [s for s in sizes],
                                f"at most {MAX_ELEMENTS} elements")
        return sizes, strides, offset

    def sym_int(self, value, where: str) -> int | None:
        """A size, stride or offset: its integer, or None for a symbolic one (its hint checked)."""
        kind, inner = self.union(value, where, frozenset({"as_int", "as_expr"}))
        if kind == "as_int":
            return self.integer(inner, where, 0, MAX_DIM)
        self.sym_expr(inner, where)
        return None

    def sym_value(self, value, where: str, concrete: str) -> None:
        kind, inner = self.union(value, where, frozenset({concrete, "as_expr"}))
        if kind == "as_expr":
            self.sym_expr(inner, where)

    def sym_expr(self, value, where: str) -> None:
        self.obj(value, where, frozenset({"expr_str", "hint"}), frozenset({"expr_str"}))
        self.expression(value["expr_str"], f"{where}.expr_str")
        if value.get("hint") is not None:
            kind, hint = self.union(value["hint"], f"{where}.hint",
                                    frozenset({"as_int", "as_bool", "as_float"}))
            if kind == "as_bool":
                self.boolean(hint, where)
            else:
                self.number(hint, where)

    def expression(self, text, where: str) -> None:
        problem = expression_problem(text)
        if problem:
            raise self.fail(where, text, f"a shape expression of bounded arithmetic ({problem})")

    # payloads: the tensors stored in the archive

    def payload_config(self, member: str, data, sizes: dict[str, int]) -> None:
        self.member = member
        folder = member.rsplit("/", 1)[0]
        constants = member.casefold().endswith("_constants_config.json")
        self.obj(data, "payload config", frozenset({"config"}), frozenset({"config"}))
        prefix = "tensor_" if constants else "weight_"
        for fqn, meta in self.dict_(data["config"], "config").items():
            where = f"config[{shown(fqn)}]"
            self.fqn(fqn, f"{'constant' if constants else 'weight'} name")
            self.obj(meta, where, frozenset({"path_name", "is_param", "use_pickle",
                                             "tensor_meta"}), frozenset({"path_name"}))
            name = meta["path_name"]
            if not (isinstance(name, str) and re.fullmatch(re.escape(prefix) + r"[0-9]{1,9}",
                                                           name)):
                raise self.fail(f"{where}.path_name", name,
                                f"{prefix}N (other payloads load by unpickling)")
            if meta.get("use_pickle"):
                raise self.fail(f"{where}.use_pickle", True, "false: unpickling the payload "
                                "would run code from the file")
            if "is_param" in meta:
                self.boolean(meta["is_param"], f"{where}.is_param")
            if meta.get("tensor_meta") is None:
                raise self.fail(f"{where}.tensor_meta", None, "the tensor's sizes and strides")
            stored = sizes.get(f"{folder}/{name}".casefold())
            if stored is None:
                raise self.fail(f"{where}.path_name", name, "a record the archive holds")
            self.stored_tensor(meta["tensor_meta"], f"{where}.tensor_meta", stored)

    def stored_tensor(self, meta, where: str, stored: int) -> None:
        sizes, strides, offset = self.tensor_meta(meta, where)
        if None in sizes or None in strides or offset is None:
            raise self.fail(where, "a symbolic size", "concrete sizes (a stored tensor has them)")
        if meta.get("layout", STRIDED) != STRIDED:
            raise self.fail(f"{where}.layout", meta.get("layout"), f"{STRIDED} (strided)")
        element = ELEMENT_SIZE.get(meta["dtype"], 1)
        numel = 1
        for size in sizes:
            numel *= size
        if stored:  # torch views the record's elements with these sizes and strides
            extent = 0 if numel == 0 else offset + 1 + sum(
                (size - 1) * stride for size, stride in zip(sizes, strides))
            if extent * element > stored:
                raise self.fail(f"{where} extent", f"{extent} elements",
                                f"within the {stored} bytes its record holds")
        self.made_up += made_up_bytes(numel * element, stored)
        if self.made_up > EXPANSION_CAP:
            raise self.fail(where, f"{numel} elements from {stored} bytes",
                            f"a tensor within {EXPANSION_FACTOR}x its stored bytes (stride 0 "
                            f"or zeros: at most {EXPANSION_CAP >> 20} MiB in all)")


