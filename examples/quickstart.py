import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import loralab

# A small Llama built from a config (any Transformers model works the same way).
torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=128,
)
model = LlamaForCausalLM(config)

# LoRA on W_q and W_v, as in the paper: "q" and "v" resolve to q_proj and v_proj here.
loralab.inject_adapter(model, loralab.LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"]))
print(loralab.trainable_parameters(model))

# One training step: only A and B (and nothing of the base) receive gradients.
tokens = torch.randint(0, 128, (4, 32))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
loss = model(input_ids=tokens, labels=tokens).loss
loss.backward()
optimizer.step()
print(f"loss {loss.item():.4f}")

# Save in PEFT's format, load onto a fresh copy of the base, then merge for zero latency.
with tempfile.TemporaryDirectory() as directory:
    loralab.save_adapter(model, directory)
    torch.manual_seed(0)
    fresh = loralab.load_adapter(LlamaForCausalLM(config), directory)
model.eval()
fresh.eval()
with torch.no_grad():
    adapted = model(tokens).logits
    merged = loralab.merge_and_unload(fresh)(tokens).logits
print(f"merged vs adapted: max |Δlogits| = {(merged - adapted).abs().max():.2e}")
assert type(fresh) is LlamaForCausalLM and torch.allclose(merged, adapted, atol=1e-5)
