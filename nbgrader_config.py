# nbgrader course layout for minildm: solutions/ holds the source notebooks (the single source of
# truth), exercises/ is what `nbgrader generate_assignment` releases from them.
c = get_config()  # noqa: F821 (nbgrader provides get_config)
c.CourseDirectory.course_id = "minildm"  # release_assignment, fetch, submit and collect need one
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "exercises"
c.CourseDirectory.db_url = "sqlite:///gradebook.db"
c.Exchange.root = "/tmp/minildm-exchange"

# Autograding (plain `nbgrader autograde` and the formgrader; `minildm grade` sets the same itself): put back test
# cells a student deleted, and warn about a changed test cell only when the student changed it, not for every test
# cell with hidden tests (jupyter/nbgrader#1961). See minildm.grade.RestoreTestCells.
c.OverwriteCells.add_missing_cells = True
try:
    import minildm.grade  # noqa: F401

    c.Autograde.sanitize_preprocessors = [
        "nbgrader.preprocessors.ClearOutput",
        "nbgrader.preprocessors.DeduplicateIds",
        "nbgrader.preprocessors.OverwriteKernelspec",
        "minildm.grade.RestoreTestCells",
        "nbgrader.preprocessors.CheckCellMetadata",
    ]
    # Feedback (nbgrader generate_feedback) shows the visible tests and the checkers' messages, never the hidden tests'
    # code: HideHiddenTests removes it and cuts their tracebacks (which quote it) to the error's last line.
    c.GenerateFeedback.preprocessors = [
        "nbgrader.preprocessors.GetGrades",
        "minildm.grade.HideHiddenTests",
        "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
    ]
except ImportError:  # nbgrader runs where minildm is not installed: nbgrader's own OverwriteCells
    pass
