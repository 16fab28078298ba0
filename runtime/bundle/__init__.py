"""The model bundle: manifest format and validator, files, staging, signatures, the station's store."""
