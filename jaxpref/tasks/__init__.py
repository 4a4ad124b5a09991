"""Built-in tasks: each a package that imports the library and registers its judge and tokenizer
under its own name when imported (jaxpref.registry finds `jaxpref.tasks.<name>` by that name)."""
