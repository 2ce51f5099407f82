"""What an ICD coding model's card says: how to load it under LoRA, the chunked ONNX feed, what its figures count."""

CARD_ADAPTER = """from peft import PeftModel
from transformers import AutoModel

from cmft import IcdCoder

merged = IcdCoder.from_pretrained(".")  # for its settings (labels, threshold, head) and tokenizer
coder = IcdCoder(AutoModel.from_pretrained("{base}"), merged.settings)
coder.tokenizer = merged.tokenizer
coder = PeftModel.from_pretrained(coder, "../adapter").eval()  # the adapter unmerged
codes = coder.predict(["{example}"])[0]  # the same codes"""
CARD_CHUNKED_FEED = """room, body = {icd[chunk_size]} - 2, ids[1:-1]  # chunks of [CLS] … [SEP]
chunks = [[ids[0], *body[i : i + room], ids[-1]] for i in range(0, max(len(body), 1), room)][:{icd[max_chunks]}]
rows = np.zeros((1, len(chunks), {icd[chunk_size]}), dtype=np.int64)
mask = np.zeros_like(rows)
for c, chunk in enumerate(chunks):
    rows[0, c, : len(chunk)], mask[0, c, : len(chunk)] = chunk, 1
feed = {{"input_ids": rows, "attention_mask": mask}}"""

CARD_USAGE = """from cmft import IcdCoder

coder = IcdCoder.from_pretrained(".")
codes = coder.predict(["{example}"])[0]  # {{code: probability}} at or above the tuned threshold"""


METRICS_NOTE = (
    "Which figures are which: `micro_f1`, `macro_f1`, the AUCs, precision@k, recall@15 and `map` count only the "
    "{n_labels} codes trained as labels (the label space); the `_all_codes` figures count every gold code of the "
    "split, a code the model cannot output being a miss, and `label_space_coverage` is the share of the split's gold "
    "codes the model can output (zero-shot codes included, when it has them). `micro_f1_category` compares "
    "3-character categories (E11.65 for E11.9 is right). Evidence (`cmft predict --evidence`): on the shipped "
    "recipe's model (cmft's tiny encoder, 80 CodiEsp test notes), masking a code's 3 attention spans took 0.61 of its "
    "probability on average, random spans of the same length 0.08 (cmft's benchmarks/README.md)."
)
