"""Built-in tasks. `reverse`: the offline demo task (word reversal with a partial-credit gold oracle);
`chartok`: its character-level tokenizer; `demo`: `spa demo`."""
