"""The study's vocabulary, settings, file locations, errors, artefact I/O, ranks and the prompt set: what every part imports."""
