"""Reading a bucket directly (s3://, oss://): its address, its listings, its source."""
