"""trainer/traces.py: sequence-level KD keeps finished (and correct) teacher samples."""
from trainer.config import GenConfig, TrainConfig
from trainer_helpers import CPU


def test_teacher_traces_keep_finished_correct_samples(monkeypatch):
    """A scripted teacher: traces are kept iff finished and (only_correct ->) graded correct by gsm8k."""
    from data.graders import gsm8k
    from model.generate import Completion
    from trainer import traces

    class Tok:
        stop_ids = [1]
        def encode(self, text):
            return [2] * len(text)
        def apply_chat_template(self, messages, add_generation_prompt):
            return "<q>" + messages[-1]["content"]

    rows = [{"id": 10, "question": "a?", "reference": "5"}, {"id": 11, "question": "b?", "reference": "7"}]
    texts = {(0, 0): ("so #### 5", "stop"), (0, 1): ("#### 6", "stop"), (0, 2): ("#### 5", "length"),
             (1, 0): ("7 = 3 + 4\n#### 7", "stop"), (1, 1): ("no idea", "stop"), (1, 2): ("#### 7.0", "stop")}
    def fake_generate(model, prompts, params, stop_ids, tokenizer, batch_size):
        assert len(prompts) == 2 and params.n == 3
        return [Completion(i, j, [], [], [], texts[i, j][1], texts[i, j][0]) for i in range(2) for j in range(3)]
    monkeypatch.setattr(traces, "generate", fake_generate)
    cfg = TrainConfig(gen=GenConfig(n=3))
    kept = traces.teacher_traces(None, Tok(), rows, cfg, CPU)
    assert [(t["id"], t["sample"]) for t in kept] == [(10, 0), (11, 0), (11, 2)]
    cfg = TrainConfig(gen=GenConfig(n=3, only_correct=False))
    everything = traces.teacher_traces(None, Tok(), rows, cfg, CPU)
    assert [(t["id"], t["sample"]) for t in everything] == [(10, 0), (10, 1), (11, 0), (11, 1), (11, 2)]
    for t in everything:
        reference = {10: "5", 11: "7"}[t["id"]]
        assert t["score"] == gsm8k.grade(t["completion"], reference).score
        assert t["prompt"].startswith("<q>" + rows[t["id"] - 10]["question"])
