"""Pass infrastructure: base class and registry, pipeline grammar, manager, report."""
