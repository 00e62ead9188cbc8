"""The shipped learned gate for span decoding over engines (models/span/topk_gate)."""

import json

from models.span.gates import get_gate
from models.span.learned import TOPK_DIR
from models.span.remote import entropy_topk, reads_entropy


def test_it_loads_by_name_and_reads_the_top5_proxy():
    gate = get_gate("learned-topk")
    assert gate.name == "learned-topk"
    assert reads_entropy(gate) and entropy_topk(gate) == 5  # what RemoteSpanBackend asks for
    assert entropy_topk(get_gate("learned")) is None  # the in-process gate: refused on engines


def test_its_training_data_is_recorded_and_never_an_evaluation_set():
    meta = json.loads((TOPK_DIR / "gate.json").read_text())["meta"]
    files = meta["trained_on"]
    assert files and all(f["license"] and len(f["sha256"]) == 64 for f in files)
    names = " ".join(f["file"].lower() for f in files)
    for banned in ("selfinstruct_user_eval", "arena", "gsm8k", "humaneval"):
        assert banned not in names
