"""Atomic writes: a unique temporary file per write, so concurrent writers of one file never
trip over each other's temporary file."""

import os
import stat
import threading

from diffmine.atomic import write_bytes, write_text


def test_two_writers_of_one_file_both_succeed_and_leave_one_whole_content(tmp_path):
    target = tmp_path / "result.json"
    contents = [b"a" * 100_000, b"b" * 50_000]  # large enough that the writes overlap
    errors = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(50):
                write_bytes(target, data)
        except Exception as exc:  # a FileNotFoundError from a shared temporary name, before the fix
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(data,)) for data in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_bytes() in contents
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left behind


def test_a_write_keeps_the_umask_permissions_and_leaves_no_temporary_file(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_text(tmp_path / "note.txt", "hello")
    finally:
        os.umask(old)
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # not mkstemp's 0600
    assert os.listdir(tmp_path) == ["note.txt"]
