"""The line console: a web app following stations' verdict streams, with history, review and dataset export."""
