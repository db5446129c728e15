"""The one rule for names read from files (ressurgeon._names): identifiers and dotted paths."""

import pytest

from ressurgeon import UnsafeFileError
from ressurgeon._names import check_class_name, check_fqn, check_identifier, is_fqn


@pytest.mark.parametrize("name", ["x", "_x", "conv_1", "L__self___layers_0", "a" * 200, "class"])
def test_identifiers_pass(name):
    assert check_identifier("node name", name) == name


@pytest.mark.parametrize("name", ["", "1x", "a b", "a.b", "x=__import__('os')", 'a")', "é",
                                  "a" * 201, None, 3, "a\nb"])
def test_non_identifiers_are_refused_with_the_field_and_value(name):
    with pytest.raises(UnsafeFileError) as info:
        check_identifier("placeholder target", name)
    line = str(info.value)
    assert line.startswith("refused: placeholder target is ") and "\n" not in line
    assert len(line) < 300


@pytest.mark.parametrize("path", ["layers.0.conv.weight", "features.10", "a", "blocks.3.attn.qkv"])
def test_dotted_paths_pass(path):
    assert check_fqn("parameter", path) == path


@pytest.mark.parametrize("path", ["a..b", ".a", "a.", "a.01", 'a"), os.system("x', "a/b",
                                  "__class__.forward", "a.__dict__", ".".join(["a"] * 65)])
def test_bad_dotted_paths_are_refused(path):
    assert not is_fqn(path)
    with pytest.raises(UnsafeFileError, match="^refused: buffer is "):
        check_fqn("buffer", path)


def test_the_root_is_an_empty_path_only_where_allowed():
    assert check_fqn("module path", "", allow_empty=True) == ""
    with pytest.raises(UnsafeFileError):
        check_fqn("module path", "")


def test_long_values_are_cut_in_the_message():
    with pytest.raises(UnsafeFileError) as info:
        check_fqn("constant", "x" * 5000 + "-")
    assert len(str(info.value)) < 300 and "..." in str(info.value)


def test_class_names_are_dotted_identifiers():
    assert check_class_name("class", "torch.nn.modules.conv.Conv2d")
    for bad in ("torch.nn.0", "a b", "os.system('x')"):
        with pytest.raises(UnsafeFileError):
            check_class_name("class", bad)
