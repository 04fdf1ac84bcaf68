"""Sections of BENCHMARKS.md that a benchmark owns, between its markers."""

import os


def replace_section(path: str, begin: str, end: str, section: str) -> None:
  """Puts `section` (which starts with `begin` and ends with `end`) in place
  of the file's text between those markers, or at its end; the rest of the
  file is left as it is."""
  text = open(path).read() if os.path.exists(path) else ''
  if begin in text and end in text:
    before, rest = text.split(begin, 1)
    after = rest.split(end, 1)[1].lstrip('\n')
    # One blank line between this section and the next.
    text = before + section.rstrip('\n') + '\n' + ('\n' + after if after else '')
  else:
    text = (text.rstrip('\n') + '\n\n' if text.strip() else '') + section
  with open(path + '.partial', 'w') as f:
    f.write(text)
  os.replace(path + '.partial', path)
