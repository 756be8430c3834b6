"""`esm-gearnet pack`: structure files, folders, lists of paths and AlphaFold DB proteome tars into a FoldComp
database (`FoldCompDB` reads it), one entry per chain, each checked after compressing.

```
esm-gearnet pack INPUT... -o DB [--workers N] [--max-ca-error 1.0] [--split-breaks] [--quiet]
```

The steps, in the order the code takes them:

1. the output: a complete database at DB (its index exists) or another file there is refused in one sentence
   (exit code 2); a `DB.partial` with its journal, left by a killed pack, is continued (below);
2. the inputs (`data.inputs.collect_inputs` with archives): each INPUT must name at least one structure file or
   archive, else one sentence naming it ends the command before anything is written (a missing path, an empty
   list, a folder without structures); inside a folder or list, what cannot be used is listed and skipped, and
   a file named twice (by any path) is packed once;
3. the structures, in input order (a folder's sorted, an archive's members in its order: `data.archives`), in
   batches of `BATCH` per worker: each is packed in a worker process (`data.packing.pack_structure`: read by
   the project's reader, split into chains, each chain compressed as clean PDB text, decoded again and compared)
   through `ordered_map`, so that a crash of foldcomp costs only its structure (run again alone, then listed);
4. the database: entries appended in that order (`DatabaseWriter`), each batch's inputs journaled as done after
   its entries; names are unique (an entry named like one already packed, from another file with the same
   name, is left out); what is left out is journaled too and listed in `DB.skipped.tsv` at the end, one row
   `input TAB reason` per file or chain.

Resuming: the journal (`DB.partial.tsv`) records every finished input; the same command run again after a kill
(or Ctrl-C) skips them and packs the rest, and the database it finishes equals one an uninterrupted run writes
(the same entries, names and order, byte for byte). Options that change the entries (`--max-ca-error`,
`--split-breaks`) are part of the journal: a pack continued with other values is refused.

Exit codes: 0 when the database holds entries, 1 when nothing could be packed (the empty database and its
`DB.skipped.tsv` are written all the same), 2 for a refusal before any work, 130 for Ctrl-C.
"""
from __future__ import annotations

import os
from itertools import islice
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

from .. import checkpoint, writing
from ..errors import Interrupted
from ..data.archives import ArchiveError, read_members, structure_members
from ..data.inputs import collect_inputs, is_archive
from ..data.io import MAX_STRUCTURE_BYTES, STRUCTURE_SUFFIXES
from ..data.io.foldcomp import DatabaseWriter, database_files
from ..data.packing import Packed, pack_structure
from ..data.parallel import ordered_map
from .arguments import pack_parser
from .exits import one_sentence

BATCH = 64  # structures per worker in one batch: the journal marks them done together (one fsync)


class Job(NamedTuple):
    """One structure to pack: `source` its path (`ARCHIVE/MEMBER` for a member of an archive), `data` its bytes
    when read from an archive (None: the worker reads the file)."""
    source: str
    data: Optional[bytes]
    max_ca_error: float
    split_breaks: bool


class Summary(NamedTuple):
    """What a pack did: `entries` in the database, `inputs` structures read (this run and the run it continued),
    `skipped` [(input, reason)] listed in `DB.skipped.tsv`."""
    path: Path
    entries: int
    inputs: int
    skipped: List[Tuple[str, str]]


@one_sentence
def main(argv: Optional[List[str]] = None) -> int:
    from .run import setup_logging

    args = pack_parser().parse_args(argv)
    setup_logging(None)
    summary = run_pack(args.inputs, args.output, args.workers, args.max_ca_error, args.split_breaks,
                       progress=not args.quiet)
    left = (f"{len(summary.skipped)} left out, listed in {summary.path}.skipped.tsv" if summary.skipped
            else "none left out")
    what = "entries (chains, or segments of broken chains)" if args.split_breaks else "chain(s)"
    print(f"packed {summary.entries} {what} from {summary.inputs} input(s) into {summary.path}; {left}")
    return 0 if summary.entries else 1


def run_pack(inputs: Sequence, output, workers: int = 2, max_ca_error: float = 1.0, split_breaks: bool = False,
             progress: bool = True) -> Summary:
    """Pack the inputs into the FoldComp database `output` (module docstring); returns what it did.

    Raises:
        ValueError: one sentence, before anything is written: a bad option, an existing output, an input that
            names no structure.
    """
    if workers < 1:
        raise ValueError(f"--workers {workers}: give at least 1 (packing runs in worker processes).")
    if not max_ca_error > 0:
        raise ValueError(f"--max-ca-error {max_ca_error:g}: give a distance in Å above 0.")
    output = _output(output)
    files, skipped = _collect(inputs)
    settings = f"max_ca_error={max_ca_error!r} split_breaks={bool(split_breaks)}"
    with writing.output_lock(output, what="database"):
        writing.remove_leftovers(output)
        writer = DatabaseWriter(output, settings)
        try:
            inputs_read = _pack(files, writer, workers, max_ca_error, split_breaks, progress)
        except KeyboardInterrupt:
            writer.abandon()  # what was journaled stays for the same command to continue
            raise Interrupted(f"interrupted; {len(writer.sources_done)} input(s) are packed into {writer.partial}: "
                              "run the same command again to continue") from None
        except BaseException:
            writer.abandon()
            raise
        writer.close()
        skipped = skipped + writer.left_out
        from .inputs import write_skipped

        write_skipped(output, skipped)
    return Summary(output, len(writer), inputs_read, skipped)


def _output(output) -> Path:
    """`-o DB` as a Path, refused at once when it names a folder, a complete database or another file."""
    path = Path(os.path.expanduser(str(output)))
    if path.is_dir():
        raise ValueError(f"-o {path} is a folder; name the database to write, e.g. {path / 'structures'}.")
    journal = Path(f"{path}.partial.tsv")
    if Path(f"{path}.index").exists():
        raise ValueError(f"{path} exists (a complete FoldComp database); choose another -o or remove it "
                         f"({', '.join(p.name for p in database_files(path))}).")
    if path.exists() and not journal.exists():  # a file that is no database being written here
        raise ValueError(f"{path} exists; choose another -o or remove it.")
    return writing.writable(path)


def _collect(inputs: Sequence) -> Tuple[List[Path], List[Tuple[str, str]]]:
    """(structure files and archives in order, [(input, reason)] skipped inside folders and lists); an input
    that names none ends the command in one sentence."""
    files: List[Path] = []
    skipped: List[Tuple[str, str]] = []
    seen = {}  # real path -> the path it was first named by
    for item in inputs:
        found, problems = collect_inputs([item], archives=True)
        if not found:
            if problems:
                reason = problems[0][1].rstrip(".")
                more = f" (and {len(problems) - 1} more like it)" if len(problems) > 1 else ""
            else:
                reason = (f"{item}: a folder with no structure files ({', '.join(STRUCTURE_SUFFIXES)}, .gz too) "
                          "or .tar archives in it")
                more = ""
            raise ValueError(f"{reason}{more}; it names nothing to pack, and nothing was written.")
        for path in found:
            first = seen.setdefault(os.path.realpath(path), path)
            if first is path:
                files.append(path)
            else:
                skipped.append((str(path), f"{path}: named more than once among the inputs (first as {first}); "
                                           "packed once."))
        skipped += problems
    return files, skipped


def _jobs(files: Sequence[Path], writer: DatabaseWriter, max_ca_error: float, split_breaks: bool, counted: list
          ) -> Iterator[Tuple[str, Optional[Job], List[Tuple[str, str]]]]:
    """(source, the job or None, rows to leave out) for every structure and archive problem, in input order,
    skipping the sources the writer has marked done; `counted[0]` counts the structures met."""
    done = writer.sources_done
    for path in files:
        if not is_archive(path):
            counted[0] += 1
            if str(path) not in done:
                yield str(path), Job(str(path), None, max_ca_error, split_breaks), []
            continue
        try:
            members = structure_members(path)
            wanted = {m for m in members if f"{path}/{m}" not in done}
            counted[0] += len(members)
            for source, data in (read_members(path, wanted) if wanted else ()):
                if data is None:  # larger than any real structure: refused from the member's header, unread
                    yield source, None, [(source, f"{source}: more than {MAX_STRUCTURE_BYTES} bytes, more than any "
                                                  "real structure; left out unread.")]
                    continue
                yield source, Job(source, data, max_ca_error, split_breaks), []
            if not members and str(path) not in done:
                yield str(path), None, [(str(path), f"{path}: the archive holds no structure files "
                                                    f"({', '.join(STRUCTURE_SUFFIXES)}, .gz too).")]
        except ArchiveError as error:
            if str(path) not in done:
                yield str(path), None, [(str(path), str(error))]


def _pack(files: Sequence[Path], writer: DatabaseWriter, workers: int, max_ca_error: float, split_breaks: bool,
          progress: bool) -> int:
    """Packs the structures of `files` into `writer` in batches; returns how many structures were met."""
    from tqdm.auto import tqdm

    counted = [0]
    names = {name for _, _, _, name in writer.rows}  # entry names are unique: a second one is left out
    stream = _jobs(files, writer, max_ca_error, split_breaks, counted)
    with tqdm(desc="packing", unit="structure", disable=not progress) as bar:
        while True:
            batch = list(islice(stream, BATCH * workers))
            if not batch:
                break
            jobs = [job for _, job, _ in batch if job is not None]
            results = iter(ordered_map(_pack_job, jobs, workers, progress=False, on_death=_died, isolated=True))
            for source, job, rows in batch:
                for name, reason in rows:
                    writer.leave_out(name, reason, source)
                if job is None:
                    continue
                for entry in next(results):
                    if entry.record is not None and entry.name in names:
                        writer.leave_out(source, f"{source}: its entry {entry.name} has the name of an entry "
                                                 "already packed (from another input); names must be unique, so "
                                                 "it is left out.", source)
                    elif entry.record is not None:
                        names.add(entry.name)
                        writer.append(entry.name, entry.record, source)
                    else:
                        writer.leave_out(source, entry.reason, source)
                bar.update()
            writer.done(*[source for source, _, _ in batch])
    return counted[0]


def _pack_job(job: Job) -> List[Packed]:
    """`pack_structure` of one job, in a worker; an error of this code is that structure's reason, never the end
    of the run."""
    try:
        return pack_structure(job.source, job.data, job.max_ca_error, job.split_breaks)
    except Exception as error:  # noqa: BLE001 - one bad structure never ends a run of thousands
        return [Packed(job.source, None, f"{job.source}: unexpected error while packing it "
                                         f"({checkpoint.first_line(error)}).")]


def _died(job: Job, how: str) -> List[Packed]:
    """The reason of a structure whose worker process died twice (foldcomp crashed, or memory ran out)."""
    what = (f"foldcomp crashed ({how}) on it" if how != "SIGKILL"
            else "the process packing it was killed (SIGKILL: out of memory?)")
    return [Packed(job.source, None, f"{job.source}: {what}, also when run again alone in a fresh process; it "
                                     "is left out.")]


__all__ = ["BATCH", "Summary", "main", "run_pack"]
