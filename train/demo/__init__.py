"""The shipped demo data (SFT chats, DPO pairs, GRPO prompts) and the GRPO demo's reward."""
