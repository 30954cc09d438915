"""Built-in methods, one package each; flawscope.registry imports them when a method is first looked up."""
