"""The library behind the entry points: finetune, distill, evaluate, main."""
