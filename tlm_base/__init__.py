"""The base layer both of tlm's packages stand on: the errors reported as one line (`errors`), crash-safe files
and appends (`fileio`), one owner per folder (`locks`) and the schemas every persisted file is read back through
(`schema`). It imports nothing of the project and never imports torch."""
