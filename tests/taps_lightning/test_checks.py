"""``taps_lightning.training.checks``: inputs that would make a run meaningless (a weights digest that is not
one, data whose class names changed since the tasks were trained) are refused before any compute,
each message naming the flag or file and the fix. (The settings groups' own ranges are tested in
``test_settings.py``.)"""
import pytest

from taps_lightning.training.checks import SettingsError, class_name_changes, data_class_names, normalize_sha256


def test_a_sha256_digest_is_kept_in_lower_case_and_anything_else_refused():
    digest = "0123456789abcdef" * 4
    assert normalize_sha256(f"  {digest.upper()}\n") == digest and normalize_sha256(None) is None
    for bad in (digest[:-1], digest + "0", "g" * 64, f"sha256:{digest}"):
        with pytest.raises(SettingsError, match=r"--model.weights_sha256 .* is not a SHA-256 digest \(64 hexadecimal "
                                                r"characters\); compute it with `sha256sum FILE`"):
            normalize_sha256(bad)


def test_changed_class_names_are_listed_task_by_task_with_the_labels_they_shift():
    recorded = {"a": ["cat", "dog", "fox"], "b": ["x", "y"], "c": ["p", "q"], "d": ["u"]}
    now = {"a": ["cat", "wolf", "fox"], "b": ["x", "y"], "c": ["p", "q", "r"], "d": None}
    message = class_name_changes(recorded, now, "the checkpoint")
    lines = message.split("\n")
    assert lines[0].startswith("the checkpoint was trained with other class names than the data has now")
    assert lines[1:3] == [
        "  - task 'a': only when trained: ['dog']; only in the data: ['wolf']; "
        "labels that now mean another class: [1: 'dog' -> 'wolf']",
        "  - task 'c': 2 classes when trained, 3 in the data; only when trained: []; only in the data: ['r']"]
    assert lines[3].startswith("Use the data the tasks were trained on")  # b is unchanged, d has no names now
    assert class_name_changes(recorded, recorded, "x") is None
    assert class_name_changes({}, now, "x") is None  # nothing recorded (an older checkpoint): nothing to compare


def test_class_names_are_read_from_the_data_module_or_none():
    class Data:
        def class_names(self, task):
            if task == "gone":
                raise OSError("no such folder")
            return (3, "dog")

    assert data_class_names(Data(), ["a", "gone"]) == {"a": ["3", "dog"], "gone": None}
    assert data_class_names(None, ["a"]) == {"a": None}
    assert data_class_names(object(), ["a"]) == {"a": None}  # a data module without class names
