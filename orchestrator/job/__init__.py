"""The job: its file's schema and errors (``spec``), the content keys that decide what is the same work
(``keys``), the frozen plan each run carries through the stages (``plan``), and every check that needs
no compute (``validate``). Nothing here starts Ray or reads more data than a listing."""
